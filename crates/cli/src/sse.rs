//! Incremental parser of Server-Sent Events (`text/event-stream`), fed with the byte chunks of
//! an HTTP body as they arrive.
//!
//! Chunks may be split anywhere, even inside a UTF-8 character or between the `\r` and `\n` of a
//! line ending: bytes are kept until a line is complete. Lines end with `\n`, `\r\n` or `\r`; a
//! blank line ends an event; `event:` sets its type (default `message`), `data:` lines are joined
//! with `\n`; comments (`:`) and other fields (`id:`, `retry:`) are ignored.

/// One complete event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The event type (`message` when the stream did not name one).
    pub event: String,
    /// The data lines, joined with `\n`.
    pub data: String,
}

/// Parser state between chunks.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the line being read.
    line: Vec<u8>,
    /// The previous byte ended a line with `\r`; a `\n` right after it belongs to that ending.
    after_cr: bool,
    /// No line has been completed yet (a byte-order mark may start the first one).
    started: bool,
    event: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk; returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(&mut out),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut out);
                }
                _ => self.line.push(b),
            }
        }
        out
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let bytes = std::mem::take(&mut self.line);
        let mut line = String::from_utf8_lossy(&bytes).into_owned();
        if !self.started {
            self.started = true;
            if let Some(rest) = line.strip_prefix('\u{feff}') {
                line = rest.to_string();
            }
        }
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = std::mem::take(&mut self.event);
        let data = std::mem::take(&mut self.data);
        if std::mem::take(&mut self.has_data) {
            out.push(SseEvent {
                event: if event.is_empty() {
                    "message".to_string()
                } else {
                    event
                },
                data,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.to_string(),
            data: data.to_string(),
        }
    }

    /// A stream with every feature the job stream uses, plus the awkward parts of the format.
    const STREAM: &str = "\u{feff}: keep-alive comment\r\n\
        event: stdout\ndata: héllo wörld ✓\n\n\
        event: stderr\r\ndata:no space\r\n\r\n\
        event: stdout\rdata: \r\r\
        data: a\ndata: b\nid: 7\nretry: 10\n\n\
        event: ignored-no-data\n\n\
        event: exit\ndata: {\"state\": \"success\", \"code\": 0}\n\n";

    fn expected() -> Vec<SseEvent> {
        vec![
            ev("stdout", "héllo wörld ✓"),
            ev("stderr", "no space"),
            ev("stdout", ""),
            ev("message", "a\nb"),
            ev("exit", "{\"state\": \"success\", \"code\": 0}"),
        ]
    }

    #[test]
    fn whole_stream_in_one_chunk() {
        let mut p = SseParser::new();
        assert_eq!(p.push(STREAM.as_bytes()), expected());
    }

    #[test]
    fn every_split_into_two_chunks() {
        let bytes = STREAM.as_bytes();
        for cut in 0..=bytes.len() {
            let mut p = SseParser::new();
            let mut got = p.push(&bytes[..cut]);
            got.extend(p.push(&bytes[cut..]));
            assert_eq!(got, expected(), "split at byte {cut}");
        }
    }

    #[test]
    fn byte_by_byte_and_pseudo_random_chunks() {
        let bytes = STREAM.as_bytes();
        let mut p = SseParser::new();
        let got: Vec<_> = bytes.iter().flat_map(|b| p.push(&[*b])).collect();
        assert_eq!(got, expected());

        // Deterministic xorshift so a failure reproduces.
        let mut seed: u32 = 0x9e37_79b9;
        for _ in 0..200 {
            let mut p = SseParser::new();
            let mut got = Vec::new();
            let mut rest = bytes;
            while !rest.is_empty() {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let n = (seed as usize % 7 + 1).min(rest.len());
                got.extend(p.push(&rest[..n]));
                rest = &rest[n..];
            }
            assert_eq!(got, expected());
        }
    }

    #[test]
    fn unfinished_event_is_not_dispatched() {
        let mut p = SseParser::new();
        assert!(p.push(b"event: stdout\ndata: partial\n").is_empty());
        assert_eq!(p.push(b"\n"), vec![ev("stdout", "partial")]);
    }
}
