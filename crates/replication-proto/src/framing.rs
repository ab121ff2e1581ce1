//! Cutting a byte stream into lines, with the protocol's length limit.

use crate::MAX_LINE_LENGTH;

/// Why the byte stream cannot be read further. The peer is sent `ERROR` and
/// the connection closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LineError {
    /// A line (or the unterminated rest of the buffer) is longer than
    /// [`MAX_LINE_LENGTH`].
    #[error("Line length exceeded")]
    TooLong,
    /// A line is not UTF-8.
    #[error("line is not valid UTF-8")]
    InvalidUtf8,
}

/// Accumulates bytes and yields complete lines (split on `\n`), skipping blank
/// ones.
///
/// ```
/// use replication_proto::LineDecoder;
///
/// let mut decoder = LineDecoder::default();
/// decoder.push(b"PING 1\n\nREPLI");
/// assert_eq!(decoder.next_line(), Some(Ok("PING 1".to_owned())));
/// assert_eq!(decoder.next_line(), None);
/// decoder.push(b"CATE \n");
/// assert_eq!(decoder.next_line(), Some(Ok("REPLICATE ".to_owned())));
/// ```
#[derive(Debug, Default)]
pub struct LineDecoder {
    buffer: Vec<u8>,
    /// Where the bytes not yet returned begin; the consumed prefix is dropped
    /// once per [`push`](LineDecoder::push), not once per line.
    start: usize,
    /// Where the search for the next newline resumes.
    scanned: usize,
    failed: bool,
}

impl LineDecoder {
    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buffer.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete, non-blank line; `None` until more bytes arrive. After
    /// an error the decoder yields that error forever: the connection is done.
    pub fn next_line(&mut self) -> Option<Result<String, LineError>> {
        loop {
            if self.failed {
                return Some(Err(LineError::TooLong));
            }
            let Some(offset) = self.buffer[self.scanned..].iter().position(|byte| *byte == b'\n') else {
                self.scanned = self.buffer.len();
                if self.buffer.len() - self.start > MAX_LINE_LENGTH {
                    self.failed = true;
                    return Some(Err(LineError::TooLong));
                }
                return None;
            };
            let (begin, end) = (self.start, self.scanned + offset);
            self.start = end + 1;
            self.scanned = self.start;
            let line = &self.buffer[begin..end];
            if line.len() > MAX_LINE_LENGTH {
                self.failed = true;
                return Some(Err(LineError::TooLong));
            }
            let Ok(line) = std::str::from_utf8(line) else {
                return Some(Err(LineError::InvalidUtf8));
            };
            if line.trim().is_empty() {
                continue;
            }
            return Some(Ok(line.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{LineDecoder, LineError};
    use crate::MAX_LINE_LENGTH;

    #[test]
    fn lines_split_on_newlines_in_any_chunking() {
        let input = b"SERVER hs\nPING 1\n   \nREPLICATE\n";
        for chunk in 1..input.len() {
            let mut decoder = LineDecoder::default();
            let mut lines = Vec::new();
            for piece in input.chunks(chunk) {
                decoder.push(piece);
                while let Some(line) = decoder.next_line() {
                    lines.push(line.unwrap());
                }
            }
            assert_eq!(lines, ["SERVER hs", "PING 1", "REPLICATE"], "chunks of {chunk}");
        }
    }

    #[test]
    fn an_overlong_line_is_an_error_even_before_its_newline() {
        let mut decoder = LineDecoder::default();
        decoder.push(&vec![b'a'; MAX_LINE_LENGTH]);
        assert_eq!(decoder.next_line(), None, "exactly the limit is fine so far");
        decoder.push(b"a");
        assert_eq!(decoder.next_line(), Some(Err(LineError::TooLong)));
        decoder.push(b"\nPING 1\n");
        assert_eq!(decoder.next_line(), Some(Err(LineError::TooLong)), "the connection is done");

        let mut decoder = LineDecoder::default();
        let mut line = vec![b'a'; MAX_LINE_LENGTH];
        line.push(b'\n');
        decoder.push(&line);
        assert!(matches!(decoder.next_line(), Some(Ok(text)) if text.len() == MAX_LINE_LENGTH));
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let mut decoder = LineDecoder::default();
        decoder.push(b"PING \xff\n");
        assert_eq!(decoder.next_line(), Some(Err(LineError::InvalidUtf8)));
    }
}
