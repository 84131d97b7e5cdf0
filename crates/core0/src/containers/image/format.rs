//! Archive format detection by content: the first bytes decide, never the file name.

/// How many leading bytes [`detect`] wants to see (one tar header block).
pub(crate) const HEADER_LEN: usize = 512;

/// The supported formats, as named in error messages.
pub(crate) const SUPPORTED: &str = "a root filesystem archive: tar (.tar), gzip-compressed tar \
     (.tar.gz, .tgz, .flist) or zstd-compressed tar (.tar.zst)";

/// The container format of an image archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// An uncompressed tar stream.
    Tar,
    /// A gzip stream (expected to hold a tar stream).
    Gzip,
    /// A zstd frame (expected to hold a tar stream).
    Zstd,
}

/// Detects the format from the first bytes of the archive (up to [`HEADER_LEN`]).
///
/// Returns `Err` with a short description of what was found when the content is not supported.
pub(crate) fn detect(head: &[u8]) -> Result<Format, String> {
    if head.starts_with(&[0x1f, 0x8b]) {
        return Ok(Format::Gzip);
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Ok(Format::Zstd);
    }
    if is_tar_header(head) {
        return Ok(Format::Tar);
    }
    Err(describe_unsupported(head))
}

/// True when `block` starts with a plausible tar header: a ustar magic at offset 257, or (for old v7
/// tars) a header whose checksum field matches its content.
pub(crate) fn is_tar_header(block: &[u8]) -> bool {
    if block.len() < HEADER_LEN {
        return false;
    }
    if &block[257..262] == b"ustar" {
        return true;
    }
    if block[0] == 0 {
        return false;
    }
    let Some(stored) = parse_octal(&block[148..156]) else {
        return false;
    };
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in block[..HEADER_LEN].iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    stored == unsigned || i64::try_from(stored).is_ok_and(|s| s == signed)
}

/// Parses a NUL/space-terminated octal header field; `None` when empty or not octal.
fn parse_octal(field: &[u8]) -> Option<u64> {
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if text.is_empty() || !text.iter().all(|b| (b'0'..=b'7').contains(b)) {
        return None;
    }
    let text = std::str::from_utf8(&text).ok()?;
    u64::from_str_radix(text, 8).ok()
}

/// A short, human description of content that is not a supported archive.
fn describe_unsupported(head: &[u8]) -> String {
    let known: &[(&[u8], &str)] = &[
        (b"\x89PNG\r\n\x1a\n", "a png image"),
        (b"\xff\xd8\xff", "a jpeg image"),
        (b"GIF8", "a gif image"),
        (b"%PDF", "a pdf document"),
        (b"PK\x03\x04", "a zip archive"),
        (b"BZh", "bzip2 data"),
        (b"\xfd7zXZ\x00", "xz data"),
        (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
        (b"\x7fELF", "an elf executable"),
        (b"SQLite format 3\0", "an sqlite database"),
    ];
    if head.is_empty() {
        return "an empty file".to_owned();
    }
    if let Some((_, name)) = known.iter().find(|(magic, _)| head.starts_with(magic)) {
        return (*name).to_owned();
    }
    let trimmed = head.iter().skip_while(|b| b.is_ascii_whitespace());
    if let Some(&first) = trimmed.clone().next()
        && (first == b'<' || first == b'{')
        && head
            .iter()
            .all(|b| !b.is_ascii_control() || b.is_ascii_whitespace())
    {
        return "html, xml or json text".to_owned();
    }
    let shown: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("unknown data starting with bytes {}", shown.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_block(name: &str, ustar: bool) -> Vec<u8> {
        let mut block = vec![0u8; HEADER_LEN];
        block[..name.len()].copy_from_slice(name.as_bytes());
        block[100..107].copy_from_slice(b"0000644");
        block[124..135].copy_from_slice(b"00000000000");
        block[156] = b'0';
        if ustar {
            block[257..263].copy_from_slice(b"ustar\0");
        }
        block[148..156].copy_from_slice(b"        ");
        let sum: u64 = block.iter().map(|&b| u64::from(b)).sum();
        let field = format!("{sum:06o}\0 ");
        block[148..156].copy_from_slice(field.as_bytes());
        block
    }

    #[test]
    fn detects_by_magic() {
        assert_eq!(detect(&[0x1f, 0x8b, 8, 0]), Ok(Format::Gzip));
        assert_eq!(detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]), Ok(Format::Zstd));
        assert_eq!(detect(&tar_block("a", true)), Ok(Format::Tar));
    }

    #[test]
    fn detects_v7_tar_by_checksum() {
        let block = tar_block("bin/busybox", false);
        assert_eq!(detect(&block), Ok(Format::Tar));
        let mut broken = block.clone();
        broken[0] = b'x';
        assert!(detect(&broken).is_err());
    }

    #[test]
    fn names_unsupported_content() {
        assert_eq!(
            detect(b"\x89PNG\r\n\x1a\n rest"),
            Err("a png image".to_owned())
        );
        assert_eq!(detect(b""), Err("an empty file".to_owned()));
        assert!(detect(b"<html>404</html>").is_err_and(|e| e.contains("text")));
        assert!(detect(&[1, 2, 3]).is_err_and(|e| e.contains("01 02 03")));
        assert!(detect(&[0u8; HEADER_LEN]).is_err());
    }
}
