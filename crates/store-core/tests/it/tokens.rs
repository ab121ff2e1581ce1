//! Tokens in their text forms, with instance IDs from `instance_map`, on both
//! engines (the spec's token text cases).

use store_core::{InstanceIds, MultiWriterToken, RoomToken, TokenParseError};
use store_test_support::{TestDb, TestResult, engine_tests};

engine_tests!(the_text_forms_of_tokens, instance_ids_are_assigned_once_and_remembered);

fn ahead(stream: i64, writers: &[(&str, i64)]) -> Result<MultiWriterToken, store_core::TokenError> {
    MultiWriterToken::new(
        stream,
        writers.iter().map(|(name, position)| ((*name).to_owned(), *position)).collect(),
    )
}

async fn the_text_forms_of_tokens(test_db: TestDb) -> TestResult {
    let ids = InstanceIds::new(test_db.db.clone());
    assert_eq!(ids.id_for("foo").await?, 1, "the first instance of a fresh database");

    let live = RoomToken::Live(MultiWriterToken::at(5));
    assert_eq!(live.to_text(&ids).await?, "s5");
    let historical = RoomToken::Historical { topological: 3, stream: 5 };
    assert_eq!(historical.to_text(&ids).await?, "t3-5");
    let vector = RoomToken::Live(ahead(5, &[("foo", 6)])?);
    assert_eq!(vector.to_text(&ids).await?, "m5~1.6");
    assert_eq!(MultiWriterToken::at(5).to_text(&ids).await?, "5");
    assert_eq!(ahead(5, &[("foo", 6)])?.to_text(&ids).await?, "m5~1.6");

    let backfilled = RoomToken::Historical { topological: 3, stream: -5 };
    assert_eq!(backfilled.to_text(&ids).await?, "t3--5");
    for token in [live, historical, vector, backfilled] {
        assert_eq!(RoomToken::parse(&token.to_text(&ids).await?, &ids).await?, token);
    }
    // An old bug wrote `m5~`: it means stream 5, and is written back as `s5`.
    let old = RoomToken::parse("m5~", &ids).await?;
    assert_eq!(old.to_text(&ids).await?, "s5");
    assert_eq!(MultiWriterToken::parse("m5~1.6", &ids).await?, ahead(5, &[("foo", 6)])?);
    assert_eq!(MultiWriterToken::parse("7", &ids).await?, MultiWriterToken::at(7));

    for bad in [
        "x5", "", "s", "sfive", "t3", "t3-x", "m5~1.5", "m5~9.8", "m5~1", "mx", "s5 ", "s-1", "s+5", "m-1",
        "t-3-5",
    ] {
        let refused = RoomToken::parse(bad, &ids).await;
        assert!(
            matches!(&refused, Err(TokenParseError::Invalid(message)) if message.starts_with("Invalid room stream token")),
            "{bad:?}: {refused:?}"
        );
    }
    for bad in ["s5", "", "-1x", "m5~1.4", "m-1", "+5"] {
        let refused = MultiWriterToken::parse(bad, &ids).await;
        assert!(matches!(&refused, Err(TokenParseError::Invalid(_))), "{bad:?}: {refused:?}");
    }
    Ok(())
}

async fn instance_ids_are_assigned_once_and_remembered(test_db: TestDb) -> TestResult {
    let ids = InstanceIds::new(test_db.db.clone());
    let (first, second) = (ids.id_for("persister1").await?, ids.id_for("persister2").await?);
    assert_ne!(first, second);
    assert_eq!(ids.id_for("persister1").await?, first);
    // Another process (a fresh cache) sees the same IDs, both ways.
    let other = InstanceIds::new(test_db.reconnect().await?);
    assert_eq!(other.name_for(second).await?.as_deref(), Some("persister2"));
    assert_eq!(other.id_for("persister1").await?, first);
    assert_eq!(other.name_for(999).await?, None);
    let token = ahead(5, &[("persister2", 9), ("persister1", 7)])?;
    let text = token.to_text(&ids).await?;
    assert_eq!(MultiWriterToken::parse(&text, &other).await?, token);
    Ok(())
}

/// Tokens come from clients: any text parses or is refused, never a panic, and
/// what parses writes back as text that parses to the same token.
#[test]
fn parsing_tokens_is_total_and_round_trips() -> TestResult {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let test_db = runtime.block_on(TestDb::new(store_core::Engine::Sqlite))?;
    let ids = InstanceIds::new(test_db.db.clone());
    runtime.block_on(async {
        for name in ["a", "b", "c"] {
            ids.id_for(name).await?;
        }
        Ok::<_, store_core::StoreError>(())
    })?;
    // Mostly token-shaped text, so that parsing gets past the first character.
    let text = prop_oneof!["[stm]?-?[0-9]{0,3}([~.-][0-9]{0,3}){0,5}", any::<String>(),];
    let mut runner = TestRunner::new(Config { cases: 512, ..Config::default() });
    runner.run(&text, |text| {
        runtime.block_on(async {
            if let Ok(token) = RoomToken::parse(&text, &ids).await {
                let written =
                    token.to_text(&ids).await.map_err(|err| TestCaseError::fail(err.to_string()))?;
                let again = RoomToken::parse(&written, &ids)
                    .await
                    .map_err(|err| TestCaseError::fail(err.to_string()))?;
                prop_assert_eq!(again, token);
            }
            if let Ok(token) = MultiWriterToken::parse(&text, &ids).await {
                let written =
                    token.to_text(&ids).await.map_err(|err| TestCaseError::fail(err.to_string()))?;
                let again = MultiWriterToken::parse(&written, &ids)
                    .await
                    .map_err(|err| TestCaseError::fail(err.to_string()))?;
                prop_assert_eq!(again, token);
            }
            Ok(())
        })
    })?;
    Ok(())
}
