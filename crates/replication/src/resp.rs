//! The little of Redis's wire protocol (RESP2) the Redis transport needs:
//! encoding commands, and decoding replies and pushed messages from a byte
//! stream. Input comes from the network, so decoding is total and bounded.

/// A decoded RESP value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RespValue {
    /// `+text`
    Simple(String),
    /// `-text`
    Error(String),
    /// `:n`
    Integer(i64),
    /// `$n` bytes, or null.
    Bulk(Option<Vec<u8>>),
    /// `*n` values, or null.
    Array(Option<Vec<RespValue>>),
}

/// Why a byte stream is not RESP (the connection is dropped and reopened).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed reply from Redis: {0}")]
pub(crate) struct RespError(String);

/// Bulk strings and arrays above these sizes are refused: replication messages
/// are lines of at most 16 KiB.
const MAX_BULK: usize = 1 << 20;
const MAX_ELEMENTS: usize = 1 << 16;
const MAX_DEPTH: usize = 8;

/// Encodes a command as a RESP array of bulk strings.
pub(crate) fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Accumulates bytes and yields complete values.
#[derive(Debug, Default)]
pub(crate) struct RespDecoder {
    buffer: Vec<u8>,
    /// Where the bytes not yet decoded begin; the consumed prefix is dropped
    /// once per `push`, not once per value.
    start: usize,
}

impl RespDecoder {
    /// Appends received bytes.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buffer.drain(..self.start);
        self.start = 0;
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete value; `None` until more bytes arrive.
    pub(crate) fn next_value(&mut self) -> Option<Result<RespValue, RespError>> {
        match parse(&self.buffer, self.start, 0) {
            Ok(Some((value, end))) => {
                self.start = end;
                Some(Ok(value))
            }
            Ok(None) => None,
            Err(err) => Some(Err(err)),
        }
    }
}

/// The line starting at `at` (without `\r\n`) and the offset after it.
fn line(buffer: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, RespError> {
    let Some(rest) = buffer.get(at..) else { return Ok(None) };
    match rest.windows(2).position(|pair| pair == b"\r\n") {
        Some(end) => Ok(Some((&rest[..end], at + end + 2))),
        None if rest.len() > MAX_BULK => Err(RespError("a header line is too long".to_owned())),
        None => Ok(None),
    }
}

fn number(text: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| RespError(format!("{:?} is not a number", String::from_utf8_lossy(text))))
}

fn length(text: &[u8], max: usize) -> Result<Option<usize>, RespError> {
    match number(text)? {
        -1 => Ok(None),
        n => usize::try_from(n)
            .ok()
            .filter(|n| *n <= max)
            .map(Some)
            .ok_or_else(|| RespError(format!("length {n} is out of bounds"))),
    }
}

fn parse(buffer: &[u8], at: usize, depth: usize) -> Result<Option<(RespValue, usize)>, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError("values nested too deeply".to_owned()));
    }
    let Some(&kind) = buffer.get(at) else { return Ok(None) };
    let Some((header, after)) = line(buffer, at + 1)? else { return Ok(None) };
    let text = || String::from_utf8_lossy(header).into_owned();
    Ok(Some(match kind {
        b'+' => (RespValue::Simple(text()), after),
        b'-' => (RespValue::Error(text()), after),
        b':' => (RespValue::Integer(number(header)?), after),
        b'$' => match length(header, MAX_BULK)? {
            None => (RespValue::Bulk(None), after),
            Some(len) => {
                if buffer.len() < after + len + 2 {
                    return Ok(None);
                }
                if &buffer[after + len..after + len + 2] != b"\r\n" {
                    return Err(RespError("a bulk string does not end with CRLF".to_owned()));
                }
                (RespValue::Bulk(Some(buffer[after..after + len].to_vec())), after + len + 2)
            }
        },
        b'*' => match length(header, MAX_ELEMENTS)? {
            None => (RespValue::Array(None), after),
            Some(count) => {
                let mut values = Vec::with_capacity(count.min(64));
                let mut offset = after;
                for _ in 0..count {
                    let Some((value, next)) = parse(buffer, offset, depth + 1)? else { return Ok(None) };
                    values.push(value);
                    offset = next;
                }
                (RespValue::Array(Some(values)), offset)
            }
        },
        other => return Err(RespError(format!("unknown type byte {other:#04x}"))),
    }))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{RespDecoder, RespValue, encode};

    fn decode_all(bytes: &[u8]) -> Vec<RespValue> {
        let mut decoder = RespDecoder::default();
        decoder.push(bytes);
        std::iter::from_fn(|| decoder.next_value()).map(|value| value.unwrap()).collect()
    }

    #[test]
    fn replies_and_messages_decode() {
        let bytes = b"+OK\r\n:3\r\n$-1\r\n*3\r\n$7\r\nmessage\r\n$2\r\nhs\r\n$6\r\nPING 1\r\n-ERR nope\r\n";
        assert_eq!(
            decode_all(bytes),
            [
                RespValue::Simple("OK".into()),
                RespValue::Integer(3),
                RespValue::Bulk(None),
                RespValue::Array(Some(vec![
                    RespValue::Bulk(Some(b"message".to_vec())),
                    RespValue::Bulk(Some(b"hs".to_vec())),
                    RespValue::Bulk(Some(b"PING 1".to_vec())),
                ])),
                RespValue::Error("ERR nope".into()),
            ]
        );
        assert_eq!(encode(&[b"PUBLISH", b"hs", b"a b"]), b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nhs\r\n$3\r\na b\r\n");
    }

    #[test]
    fn partial_input_waits_and_garbage_is_an_error() {
        let mut decoder = RespDecoder::default();
        decoder.push(b"*2\r\n$3\r\nab");
        assert_eq!(decoder.next_value(), None);
        decoder.push(b"c\r\n:1\r\n");
        assert!(matches!(decoder.next_value(), Some(Ok(RespValue::Array(Some(_))))));
        for garbage in [&b"?x\r\n"[..], b"$5\r\nabc\r\nxx", b"*99999999\r\n", b":x\r\n", b"$-2\r\n"] {
            let mut decoder = RespDecoder::default();
            decoder.push(garbage);
            assert!(matches!(decoder.next_value(), Some(Err(_))), "{:?}", String::from_utf8_lossy(garbage));
        }
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_without_panicking(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..8)) {
            let mut decoder = RespDecoder::default();
            for chunk in &chunks {
                decoder.push(chunk);
                while let Some(Ok(_)) = decoder.next_value() {}
            }
        }

        #[test]
        fn encoded_commands_decode_back(args in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..30), 1..5)) {
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let decoded = decode_all(&encode(&refs));
            let expected = RespValue::Array(Some(args.iter().map(|arg| RespValue::Bulk(Some(arg.clone()))).collect()));
            prop_assert_eq!(decoded, vec![expected]);
        }
    }
}
