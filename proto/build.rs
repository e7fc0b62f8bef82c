//! Generates the gRPC code of proto/spa/v1 with the vendored protoc (nothing to install), a
//! file descriptor set for gRPC reflection, and one constant per RPC method path so that
//! signing and verification name methods without string literals that could drift.
use std::fmt::Write as _;
use std::path::PathBuf;

use prost::Message as _;

const PROTOS: &[&str] = &[
    "proto/spa/v1/common.proto",
    "proto/spa/v1/device.proto",
    "proto/spa/v1/admin.proto",
    "proto/spa/v1/backbone.proto",
    "proto/spa/v1/rounds.proto",
    "proto/spa/v1/aggregator.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("spa_descriptor.bin");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Channels are built by the binaries (TLS, limits); the generated `connect` helper
        // would pull tonic's transport into this crate for nothing.
        .build_transport(false)
        // Deterministic encoding of any future map field: request signatures cover the
        // prost encoding of the body, re-encoded by the receiver.
        .btree_map(".")
        // A message that does not decode is INVALID_ARGUMENT, not tonic-prost's INTERNAL.
        .codec_path("crate::codec::StrictCodec")
        .file_descriptor_set_path(&descriptor_path)
        .compile_protos(PROTOS, &["proto"])?;

    let fds = prost_types::FileDescriptorSet::decode(std::fs::read(&descriptor_path)?.as_slice())?;
    let mut out = String::new();
    let mut all = Vec::new();
    for file in &fds.file {
        let package = file.package();
        for service in &file.service {
            for method in &service.method {
                let name = format!("{}_{}", screaming_snake(service.name()), screaming_snake(method.name()));
                let path = format!("/{package}.{}/{}", service.name(), method.name());
                writeln!(out, "/// `{path}`")?;
                writeln!(out, "pub const {name}: &str = \"{path}\";")?;
                all.push(name);
            }
        }
    }
    writeln!(out, "/// Every RPC method path of the protocol.")?;
    writeln!(out, "pub const ALL: &[&str] = &[{}];", all.join(", "))?;
    std::fs::write(out_dir.join("spa_methods.rs"), out)?;
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}

/// `GetModelInfo` -> `GET_MODEL_INFO`.
fn screaming_snake(camel: &str) -> String {
    let mut s = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            s.push('_');
        }
        s.push(c.to_ascii_uppercase());
    }
    s
}
