fn main() -> anyhow::Result<()> {
    anyhow::bail!("quickstart: coming (see README.md)")
}
