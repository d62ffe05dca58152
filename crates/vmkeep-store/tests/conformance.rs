//! Every backend passes the same conformance suite (vmkeep-testkit's `conformance`): a local
//! folder, and S3 on two real servers: a 3-node Garage cluster (replication factor 3; it
//! ignores conditional writes) and moto (which honours them). The HTTPS backend runs it in
//! vmkeep-server's tests, against a real `vmkeep serve`.
use std::sync::Arc;

use vmkeep_store::{LocalStore, S3Options, S3Store, Store};
use vmkeep_testkit::conformance;
use vmkeep_testkit::s3::{Garage, Moto};

#[test]
fn a_local_folder_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(LocalStore::create(dir.path().join("r")).unwrap());
    let report = conformance::run(store);
    assert!(report.conditional_writes_honoured);
}

#[test]
fn s3_on_a_three_node_garage_cluster_conforms() {
    let garage = Garage::start(3);
    garage.bucket("conformance");
    for url in ["s3://conformance", "s3://conformance/some/prefix"] {
        let store = S3Store::open_with(url, garage.s3.config(), S3Options::default()).unwrap();
        let report = conformance::run(Arc::new(store));
        // Garage ignores If-None-Match (deps.md): the protocol must not need it.
        assert!(!report.conditional_writes_honoured, "{url}");
    }
}

#[test]
fn s3_on_moto_conforms() {
    let moto = Moto::start();
    moto.bucket("conformance");
    let store =
        S3Store::open_with("s3://conformance/p", moto.s3.config(), S3Options::default()).unwrap();
    let report = conformance::run(Arc::new(store));
    assert!(report.conditional_writes_honoured);
}
