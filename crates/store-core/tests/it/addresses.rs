//! Each instance's HTTP address, recorded at start-up and read by the others.

use store_core::{http_address_of, record_http_address};
use store_test_support::{TestDb, TestResult, engine_tests};

engine_tests!(an_address_recorded_again_replaces_the_first);

async fn an_address_recorded_again_replaces_the_first(test_db: TestDb) -> TestResult {
    let db = &test_db.db;
    assert_eq!(http_address_of(db, "persister1").await?, None, "never started");
    record_http_address(db, "persister1", "10.0.0.7:8101").await?;
    record_http_address(db, "persister2", "10.0.0.8:8102").await?;
    assert_eq!(http_address_of(db, "persister1").await?.as_deref(), Some("10.0.0.7:8101"));
    // Restarted on another port.
    record_http_address(db, "persister1", "10.0.0.7:9101").await?;
    assert_eq!(http_address_of(db, "persister1").await?.as_deref(), Some("10.0.0.7:9101"));
    assert_eq!(http_address_of(db, "persister2").await?.as_deref(), Some("10.0.0.8:8102"));
    Ok(())
}
