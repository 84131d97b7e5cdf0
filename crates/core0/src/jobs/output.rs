//! The process output protocol (§2.4): stdout lines are level 1, stderr lines level 2, a line
//! `N::text` is one message of level N, and `N:::` … `:::` is a multi-line message of level N.
//! [`Capture`] keeps what a Result needs: the last lines of stdout and stderr, the last
//! result-level message and the last critical message.

use grid_proto::commands::MAX_OUTPUT_LINES;
use grid_proto::wire::level;
use std::collections::VecDeque;

/// Splits one output stream into messages, keeping the state of an open multi-line block.
#[derive(Debug, Default)]
pub struct LineParser {
    block: Option<(u16, String)>,
}

/// `N::` or `N:::` at the start of a line.
enum Prefix<'a> {
    Single(u16, &'a str),
    BlockStart(u16),
}

fn prefix(line: &str) -> Option<Prefix<'_>> {
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let (num, rest) = line.split_at(digits);
    let level: u16 = num.parse().ok()?;
    if rest.starts_with(":::") {
        Some(Prefix::BlockStart(level))
    } else {
        rest.strip_prefix("::")
            .map(|text| Prefix::Single(level, text))
    }
}

impl LineParser {
    /// Feeds one line (without its newline) read from a stream whose plain lines have level
    /// `plain`; returns the message it completes, if any.
    pub fn feed(&mut self, line: &str, plain: u16) -> Option<(u16, String)> {
        if let Some((lvl, text)) = &mut self.block {
            if line == ":::" {
                let lvl = *lvl;
                let text = std::mem::take(text);
                self.block = None;
                return Some((lvl, text));
            }
            // As in the original, every line of a block is preceded by "\n", so the collected
            // text starts with a newline.
            text.push('\n');
            text.push_str(line);
            return None;
        }
        match prefix(line) {
            Some(Prefix::Single(lvl, text)) => Some((lvl, text.to_string())),
            Some(Prefix::BlockStart(lvl)) => {
                self.block = Some((lvl, String::new()));
                None
            }
            None => Some((plain, line.to_string())),
        }
    }
}

/// What a run's output contributes to its Result.
#[derive(Debug, Default)]
pub struct Capture {
    stdout: VecDeque<String>,
    stderr: VecDeque<String>,
    /// Text of the last result-level message (20–23, 30).
    pub data: String,
    /// Level of `data`, 0 when there was none.
    pub level: u16,
    /// Text of the last level-9 message.
    pub critical: String,
}

fn keep(buf: &mut VecDeque<String>, line: &str) {
    if buf.len() == MAX_OUTPUT_LINES {
        buf.pop_front();
    }
    buf.push_back(format!("{line}\n"));
}

impl Capture {
    /// Records one message.
    pub fn add(&mut self, lvl: u16, text: &str) {
        match lvl {
            level::STDOUT => keep(&mut self.stdout, text),
            level::STDERR => keep(&mut self.stderr, text),
            level::CRITICAL => self.critical = text.to_string(),
            l if level::is_result(l) => {
                self.data = text.to_string();
                self.level = l;
            }
            _ => {}
        }
    }

    /// `[stdout, stderr]`, every line ending in "\n".
    pub fn streams(&self) -> [String; 2] {
        [
            self.stdout.iter().map(String::as_str).collect(),
            self.stderr.iter().map(String::as_str).collect(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_prefixed_lines() {
        let mut p = LineParser::default();
        assert_eq!(p.feed("hello", 1), Some((1, "hello".into())));
        assert_eq!(p.feed("hello", 2), Some((2, "hello".into())));
        assert_eq!(p.feed("20::{\"a\":1}", 1), Some((20, "{\"a\":1}".into())));
        assert_eq!(p.feed("9::boom", 1), Some((9, "boom".into())));
        assert_eq!(p.feed("12:x", 1), Some((1, "12:x".into())));
        assert_eq!(p.feed("::x", 1), Some((1, "::x".into())));
        assert_eq!(p.feed("99999999::x", 1), Some((1, "99999999::x".into())));
    }

    #[test]
    fn multi_line_block_starts_with_newline() {
        let mut p = LineParser::default();
        assert_eq!(p.feed("20:::", 1), None);
        assert_eq!(p.feed("[1,", 1), None);
        assert_eq!(p.feed("2]", 1), None);
        assert_eq!(p.feed(":::", 1), Some((20, "\n[1,\n2]".into())));
        assert_eq!(p.feed("after", 1), Some((1, "after".into())));
    }

    #[test]
    fn capture_keeps_last_lines_and_result() {
        let mut c = Capture::default();
        for i in 0..(MAX_OUTPUT_LINES + 5) {
            c.add(1, &i.to_string());
        }
        c.add(2, "err");
        c.add(20, "{}");
        c.add(9, "crit");
        c.add(5, "log");
        let [out, err] = c.streams();
        assert_eq!(out.lines().count(), MAX_OUTPUT_LINES);
        assert!(out.starts_with("5\n"));
        assert!(out.ends_with(&format!("{}\n", MAX_OUTPUT_LINES + 4)));
        assert_eq!(err, "err\n");
        assert_eq!((c.data.as_str(), c.level), ("{}", 20));
        assert_eq!(c.critical, "crit");
    }
}
