//! `MultiWriterIdGenerator::is_handed_out`: whether a position was ever handed
//! out by the stream's sequence (or SQLite's counter), which replication asks
//! before it takes a token from another process.

use std::time::Duration;

use store_core::{Database, Engine, MultiWriterIdGenerator, StoreError};
use store_test_support::{TestDb, TestResult, engine_tests};

use crate::id_generators::Harness;

engine_tests!(
    what_this_generator_allocated_is_handed_out,
    a_backwards_stream_hands_out_negative_positions_only,
    an_abandoned_id_stays_handed_out_after_a_restart,
    a_position_learnt_from_its_writer_needs_no_read,
);

/// A follower told by a writer's answer that a position was handed out takes
/// it without reading the sequence, and nothing beyond it.
async fn a_position_learnt_from_its_writer_needs_no_read(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    let writer = harness.generator("writer", &["writer", "follower"]).await?;
    let follower = harness.generator("follower", &["writer", "follower"]).await?;
    let ids = writer.get_next_mult(3).await?;
    let last = *ids.ids().last().ok_or("allocated")?;
    ids.finish().await?;
    let reads = sequence_reads(&harness.db);
    follower.learn_handed_out(last - 1);
    follower.learn_handed_out(0);
    follower.learn_handed_out(-5);
    assert!(follower.is_handed_out(last - 1).await?);
    assert_eq!(sequence_reads(&harness.db), reads, "learnt, not read");
    // Beyond what it learnt, it asks as before (PostgreSQL's sequence; on
    // SQLite the counter is the writer's, so the follower cannot know).
    let beyond = follower.is_handed_out(last).await?;
    assert_eq!(beyond, test_db.db.engine() == Engine::Postgres);
    assert!(!follower.is_handed_out(last + 1).await?);
    Ok(())
}

/// How many times `db` has read a stream's sequence for `is_handed_out`.
fn sequence_reads(db: &Database) -> u64 {
    db.interaction_stats().get("read_stream_sequence").map_or(0, |stats| stats.count)
}

async fn what_this_generator_allocated_is_handed_out(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    harness.insert_rows("master", 7).await?;
    let generator = harness.generator("master", &["master"]).await?;
    let guard = generator.get_next().await?;
    assert_eq!(guard.id(), 8);
    let reads = sequence_reads(&harness.db);
    for position in [1, 7, 8] {
        assert!(generator.is_handed_out(position).await?, "{position} was handed out");
    }
    assert_eq!(sequence_reads(&harness.db), reads, "what the generator knows needs no query");
    assert!(!generator.is_handed_out(9).await?, "9 is beyond the sequence");
    for impossible in [0, -8, i64::MIN] {
        assert!(!generator.is_handed_out(impossible).await?, "{impossible} is never handed out");
    }
    guard.finish().await?;
    assert!(generator.is_handed_out(8).await?);
    if test_db.db.engine() == Engine::Sqlite {
        assert_eq!(sequence_reads(&harness.db), 0, "SQLite's counter is this process's own");
    }
    Ok(())
}

async fn a_backwards_stream_hands_out_negative_positions_only(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], false).await?;
    let generator = harness.generator("master", &["master"]).await?;
    let guards = generator.get_next_mult(2).await?;
    let furthest = *guards.ids().last().ok_or("allocated")?;
    assert!(furthest < -1);
    assert!(generator.is_handed_out(furthest).await?);
    assert!(generator.is_handed_out(furthest + 1).await?);
    assert!(!generator.is_handed_out(furthest - 1).await?, "beyond the sequence");
    assert!(!generator.is_handed_out(-furthest).await?, "the wrong direction");
    assert!(!generator.is_handed_out(0).await?);
    guards.finish().await?;
    Ok(())
}

async fn an_abandoned_id_stays_handed_out_after_a_restart(test_db: TestDb) -> TestResult {
    let harness = Harness::new(&test_db, &["foobar"], true).await?;
    harness.insert_rows("master", 7).await?;
    let generator = harness.generator("master", &["master"]).await?;
    let result: Result<(), StoreError> = harness
        .db
        .run_interaction("write_then_fail", |txn| {
            let generator = generator.clone();
            Box::pin(async move {
                assert_eq!(generator.get_next_txn(txn).await?, 8);
                Err(StoreError::Misconfigured("the write fails".to_owned()))
            })
        })
        .await;
    assert!(result.is_err());
    for _ in 0..200 {
        if generator.get_current_token() == 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(generator.get_current_token(), 8, "the stream moved past the rolled-back ID");
    drop(generator);

    let db = test_db.reconnect().await?;
    let restarted = MultiWriterIdGenerator::new(&db, harness.config("master", &["master"])).await?;
    assert!(restarted.is_handed_out(8).await?, "a client may hold a token of 8");
    // A counter's mark runs ahead of what it handed out, and the restarted
    // stream starts there; nothing past its token is handed out yet.
    let token = restarted.get_current_token();
    assert!(token >= 8);
    assert!(!restarted.is_handed_out(token + 1).await?, "{} is beyond anything handed out", token + 1);
    Ok(())
}

// ---- PostgreSQL only: several processes on one sequence ----

mod postgres_only {
    use super::*;

    async fn harness() -> Result<(TestDb, Harness), Box<dyn std::error::Error>> {
        let test_db = TestDb::new(Engine::Postgres).await?;
        let harness = Harness::new(&test_db, &["foobar"], true).await?;
        harness.consume_first_id().await?;
        Ok((test_db, harness))
    }

    #[tokio::test]
    async fn another_writer_on_the_sequence_hands_out_higher_positions() -> TestResult {
        let (_db, harness) = harness().await?;
        let writers = ["first", "second"];
        let first = harness.generator("first", &writers).await?;
        let second = harness.generator("second", &writers).await?;
        let known = first.get_current_token_for_writer("first");
        let guard = second.get_next().await?;
        let theirs = guard.id();
        assert!(theirs > known);

        let reads = sequence_reads(&harness.db);
        assert!(first.is_handed_out(known).await?);
        assert_eq!(sequence_reads(&harness.db), reads, "known here: no query");
        assert!(first.is_handed_out(theirs).await?, "the other writer took it from the sequence");
        assert_eq!(sequence_reads(&harness.db), reads + 1);
        assert!(first.is_handed_out(theirs).await?);
        assert_eq!(sequence_reads(&harness.db), reads + 1, "the last read is remembered");
        assert!(!first.is_handed_out(theirs + 1).await?, "past the sequence");
        assert_eq!(sequence_reads(&harness.db), reads + 2);
        guard.finish().await?;

        // A reader, which never allocates, asks the same sequence.
        let reader = harness.generator("reader", &writers).await?;
        let later = second.get_next_mult(3).await?;
        let last = *later.ids().last().ok_or("allocated")?;
        assert!(reader.is_handed_out(last).await?);
        assert!(!reader.is_handed_out(last + 1).await?);
        later.finish().await?;
        Ok(())
    }

    #[tokio::test]
    async fn a_stream_without_writers_reads_its_sequence_too() -> TestResult {
        // Like the `caches` stream: no writers list, any process allocates.
        let (_db, harness) = harness().await?;
        let here = harness.generator("here", &[]).await?;
        let elsewhere = harness.generator("elsewhere", &[]).await?;
        let guard = elsewhere.get_next().await?;
        assert!(here.is_handed_out(guard.id()).await?);
        assert!(!here.is_handed_out(guard.id() + 1).await?);
        guard.finish().await?;
        Ok(())
    }

    #[tokio::test]
    async fn a_sequence_not_yet_called_has_not_handed_out_its_last_value() -> TestResult {
        let (_db, harness) = harness().await?;
        let generator = harness.generator("master", &["master"]).await?;
        harness
            .db
            .run_autocommit("setval_not_called", |txn| {
                Box::pin(async move {
                    txn.execute("SELECT setval('foobar_seq', 10, false)", &[]).await.map(|_| ())
                })
            })
            .await?;
        assert!(generator.is_handed_out(9).await?);
        assert!(!generator.is_handed_out(10).await?, "10 is the next value, not yet handed out");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_questions_share_one_read() -> TestResult {
        let (_db, harness) = harness().await?;
        let writers = ["first", "second"];
        let first = harness.generator("first", &writers).await?;
        let second = harness.generator("second", &writers).await?;
        let guard = second.get_next_mult(5).await?;
        let reads = sequence_reads(&harness.db);
        let mut questions = tokio::task::JoinSet::new();
        for id in guard.ids().to_vec() {
            for _ in 0..4 {
                let first = first.clone();
                questions.spawn(async move { first.is_handed_out(id).await });
            }
        }
        while let Some(answer) = questions.join_next().await {
            assert!(answer??);
        }
        assert_eq!(sequence_reads(&harness.db), reads + 1, "one read answered everyone");
        guard.finish().await?;
        Ok(())
    }
}
