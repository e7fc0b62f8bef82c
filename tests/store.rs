//! The store's contract (spa_coordinator::store::conformance) on each backend: sled, and a
//! real PostgreSQL per test started by the project's script.
mod on_sled {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use spa_coordinator::store::Store;
    use spa_coordinator::store::conformance as check;

    /// Opens the store at `path`, waiting out sled's background writer, which may hold the
    /// file lock a moment after the last handle is dropped (seen once in six runs under load).
    fn open(path: &Path) -> Store {
        let started = Instant::now();
        loop {
            match Store::open(path) {
                Ok(s) => return s,
                Err(_) if started.elapsed() < Duration::from_secs(5) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("{e}"),
            }
        }
    }

    macro_rules! on_sled {
        ($($name:ident),*) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("store");
                check::$name(&async || open(&path)).await;
            }
        )*};
    }

    on_sled!(
        devices_tokens_and_checkpoints_survive_reopen,
        rounds_commit_as_one_and_read_back_in_order,
        concurrent_runs_and_reports_lose_nothing,
        revocations_racing_enrollments_and_rotations_lose_nothing,
        of_two_rotations_signed_by_the_same_key_one_wins,
        history_is_pruned_by_count_and_age
    );
}

/// The same checks on a real PostgreSQL, a throwaway cluster per test started by
/// `scripts/postgres.sh` (which `.ci/run` installs); then what only PostgreSQL has: schema
/// migrations, outages, the leadership lease between processes sharing the database.
mod on_postgres {
    use spa_coordinator::store::conformance as check;
    use spa_coordinator::store::postgres::schema;
    use spa_coordinator::store::{Store, StoreError};
    use spa_testkit::postgres::Cluster;

    macro_rules! on_postgres {
        ($($name:ident),*) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let pg = Cluster::start();
                check::$name(&async || Store::connect_postgres(&pg.conninfo, 8).await.unwrap()).await;
            }
        )*};
    }

    on_postgres!(
        devices_tokens_and_checkpoints_survive_reopen,
        rounds_commit_as_one_and_read_back_in_order,
        concurrent_runs_and_reports_lose_nothing,
        revocations_racing_enrollments_and_rotations_lose_nothing,
        of_two_rotations_signed_by_the_same_key_one_wins,
        history_is_pruned_by_count_and_age
    );

    /// Coordinators starting together apply the schema once; a schema newer than the
    /// binary's is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coordinators_starting_together_migrate_once_and_a_newer_schema_is_refused() {
        let pg = Cluster::start();
        let starts: Vec<_> = (0..4)
            .map(|_| {
                let c = pg.conninfo.clone();
                tokio::spawn(async move { Store::connect_postgres(&c, 2).await.map(|_| ()) })
            })
            .collect();
        for s in starts {
            s.await.unwrap().unwrap();
        }
        let (client, conn) = tokio_postgres::connect(&pg.conninfo, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let versions: Vec<i32> = client.query("SELECT version FROM spa_schema", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(versions, [schema::newest()]);
        client.execute("UPDATE spa_schema SET version = version + 1", &[]).await.unwrap();
        let e = Store::connect_postgres(&pg.conninfo, 2).await.err().expect("a newer schema is refused");
        assert!(matches!(e, StoreError::Schema(_)), "{e}");
    }

    /// A database that goes away is an I/O error (UNAVAILABLE to callers, nothing
    /// acknowledged); once it is back the same store works again, with what it had.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_that_goes_away_is_an_io_error_until_it_returns() {
        let pg = Cluster::start();
        let s = Store::connect_postgres(&pg.conninfo, 2).await.unwrap();
        assert!(s.put_checkpoint(0, b"v0").await.unwrap());
        pg.stop();
        let e = s.put_checkpoint(1, b"v1").await.unwrap_err();
        assert!(e.is_io(), "{e}");
        assert!(!s.heal().await);
        pg.resume();
        assert!(s.heal().await);
        assert_eq!(s.latest_checkpoint_version().await.unwrap(), Some(0));
        assert!(s.put_checkpoint(1, b"v1").await.unwrap());
    }

    /// One holder leads at a time; a lease left to expire passes to the next holder with a
    /// new term, and the old holder's round writes are refused (fenced) from then on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_coordinator_leads_and_a_lapsed_leader_is_fenced_off() {
        let pg = Cluster::start();
        let s = Store::connect_postgres(&pg.conninfo, 4).await.unwrap();
        let a = s.lead("a", "https://a:1", 300).await.unwrap().expect("a takes the free lease");
        assert_eq!(s.lead("b", "https://b:1", 300).await.unwrap(), None, "b waits while a's lease runs");
        assert_eq!(s.leader_url().await.unwrap().as_deref(), Some("https://a:1"));
        assert_eq!(s.lead("a", "https://a:1", 300).await.unwrap(), Some(a.clone()), "a renews in its term");
        let plan = check::plan(2, spa_aggregation::strategy::StrategyName::FedAvg);
        let run = s.create_run(&plan, 0).await.unwrap();
        let round = s.start_round(&a, &run).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        assert_eq!(s.leader_url().await.unwrap(), None, "a lapsed lease names no leader");
        let b = s.lead("b", "https://b:1", 60_000).await.unwrap().expect("b takes the lapsed lease");
        assert_eq!(s.leader_url().await.unwrap().as_deref(), Some("https://b:1"));
        assert_eq!(b.term, a.term + 1);
        for e in [s.put_round(&a, &round).await.unwrap_err(), s.start_round(&a, &run).await.unwrap_err(), s.put_run(&a, &run).await.unwrap_err()] {
            assert!(matches!(e, StoreError::Fenced(t) if t == a.term), "{e}");
        }
        assert_eq!(s.lead("a", "https://a:1", 300).await.unwrap(), None);
        s.abort_round(&b, &round).await.unwrap();
        assert_eq!(s.rounds().await.unwrap().len(), 1, "the fenced start wrote nothing");
    }
}
