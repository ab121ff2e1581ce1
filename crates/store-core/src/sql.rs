//! One SQL dialect for stores: PostgreSQL's numbered placeholders (`$1`, `$2`, …).
//!
//! Stores write each statement once. PostgreSQL takes the text as it is; for SQLite
//! the placeholders are rewritten to SQLite's own numbered form (`?1`, `?2`, …),
//! which binds by number exactly as PostgreSQL does, so a placeholder may be used
//! more than once. Quoted strings, quoted identifiers and comments are copied
//! untouched.

use std::borrow::Cow;

/// Rewrites `$N` placeholders to `?N` for SQLite.
///
/// Refuses a bare `?`: mixing styles would bind differently on the two engines.
pub(crate) fn to_sqlite(sql: &str) -> Result<Cow<'_, str>, String> {
    if !sql.contains(['$', '?']) {
        return Ok(Cow::Borrowed(sql));
    }
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut idx = 0;
    let mut copied_upto = 0;
    while idx < bytes.len() {
        match bytes[idx] {
            quote @ (b'\'' | b'"') => idx = skip_quoted(bytes, idx, quote)?,
            b'-' if bytes.get(idx + 1) == Some(&b'-') => {
                idx = sql[idx..].find('\n').map_or(bytes.len(), |end| idx + end + 1);
            }
            b'/' if bytes.get(idx + 1) == Some(&b'*') => {
                idx = sql[idx + 2..].find("*/").map(|end| idx + 2 + end + 2).ok_or("unterminated comment")?;
            }
            b'$' => {
                let digits = bytes[idx + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
                if digits == 0 {
                    return Err(format!("`$` at byte {idx} is not followed by a parameter number"));
                }
                out.push_str(&sql[copied_upto..idx]);
                out.push('?');
                out.push_str(&sql[idx + 1..idx + 1 + digits]);
                idx += 1 + digits;
                copied_upto = idx;
            }
            b'?' => {
                return Err(format!(
                    "`?` placeholder at byte {idx}: write numbered placeholders ($1, $2, …)"
                ));
            }
            _ => idx += 1,
        }
    }
    out.push_str(&sql[copied_upto..]);
    Ok(Cow::Owned(out))
}

/// Returns the index just past the closing quote; a doubled quote is an escape.
fn skip_quoted(bytes: &[u8], start: usize, quote: u8) -> Result<usize, String> {
    let mut idx = start + 1;
    while idx < bytes.len() {
        if bytes[idx] == quote {
            if bytes.get(idx + 1) == Some(&quote) {
                idx += 2;
                continue;
            }
            return Ok(idx + 1);
        }
        idx += 1;
    }
    Err(format!("unterminated quote starting at byte {start}"))
}

#[cfg(test)]
mod tests {
    use super::to_sqlite;

    fn check(input: &str, expected: Result<&str, &str>) {
        let actual = to_sqlite(input);
        match (actual, expected) {
            (Ok(actual), Ok(expected)) => assert_eq!(actual, expected, "input: {input}"),
            (Err(actual), Err(expected)) => assert!(actual.contains(expected), "{actual:?} vs {expected:?}"),
            (actual, expected) => panic!("input {input:?}: got {actual:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn placeholders_are_renumbered_in_sqlite_form() {
        check("SELECT 1", Ok("SELECT 1"));
        check("SELECT a FROM t WHERE b = $1 AND c = $2", Ok("SELECT a FROM t WHERE b = ?1 AND c = ?2"));
        check("SELECT $12, $1, $12", Ok("SELECT ?12, ?1, ?12"));
        check("INSERT INTO t VALUES ($1,$2)", Ok("INSERT INTO t VALUES (?1,?2)"));
    }

    #[test]
    fn quoted_text_and_comments_are_left_alone() {
        check("SELECT '$1', \"$2\" FROM t WHERE a = $1", Ok("SELECT '$1', \"$2\" FROM t WHERE a = ?1"));
        check("SELECT 'it''s $1?' WHERE a = $1", Ok("SELECT 'it''s $1?' WHERE a = ?1"));
        check("SELECT 1 -- cost $5?\nWHERE a = $1", Ok("SELECT 1 -- cost $5?\nWHERE a = ?1"));
        check("SELECT /* $1 ? */ $1", Ok("SELECT /* $1 ? */ ?1"));
    }

    #[test]
    fn malformed_text_is_refused_not_guessed() {
        check("SELECT a WHERE b = ?", Err("write numbered placeholders"));
        check("SELECT $a", Err("not followed by a parameter number"));
        check("SELECT $1, 'open", Err("unterminated quote"));
        check("SELECT $1 /* open", Err("unterminated comment"));
    }
}
