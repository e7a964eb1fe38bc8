//! A minimal writer for "newc" cpio archives, the format of a Linux initramfs.
//!
//! The kernel accepts several archives concatenated: the guest kit writes a
//! cached base archive once and appends a small per-test archive to it.

/// One archive being built in memory.
#[derive(Debug, Default)]
pub struct CpioWriter {
    buf: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl CpioWriter {
    /// An empty archive. `first_ino` keeps inode numbers of concatenated archives apart.
    pub fn new(first_ino: u32) -> CpioWriter {
        CpioWriter {
            buf: Vec::new(),
            ino: first_ino,
        }
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & S_IFDIR == S_IFDIR { 2 } else { 1 },
            0,
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[]);
    }

    /// Adds a regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, S_IFREG | (perm & 0o7777), (0, 0), data);
    }

    /// Adds a symbolic link `name` -> `target`.
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | 0o600, (major, minor), &[]);
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        // The kernel reads archives in 512-byte blocks only for the outer
        // compression layer; padding to 512 keeps concatenation tidy.
        while self.buf.len() % 512 != 0 {
            self.buf.push(0);
        }
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cpio_newc_layout() {
        let mut w = CpioWriter::new(0);
        w.file("/a", 0o644, b"xyz");
        let out = w.finish();
        assert_eq!(&out[..6], b"070701");
        // Header is 110 bytes, then "a\0" padded to 4 (112), then data.
        assert_eq!(&out[110..112], b"a\0");
        assert_eq!(&out[112..115], b"xyz");
        // File size field (7th) is 3.
        assert_eq!(&out[6 + 6 * 8..6 + 7 * 8], b"00000003");
        let trailer = out.windows(10).position(|w| w == b"TRAILER!!!");
        assert!(trailer.is_some());
        assert_eq!(out.len() % 512, 0);
    }

    #[test]
    fn test_cpio_readable_by_cpio_tool() {
        let Some(cpio) = crate::env::which("cpio") else {
            ioasis_test_skip::skip(
                "`cpio` not found in PATH (Debian package cpio; scripts/setup.sh installs it)",
            );
            return;
        };
        let mut w = CpioWriter::new(0);
        w.dir("d");
        w.file("d/f", 0o755, b"hello");
        w.symlink("d/l", "f");
        let bytes = w.finish();
        let dir = crate::env::WorkDir::new("cpio").expect("workdir");
        let archive = dir.join("a.cpio");
        std::fs::write(&archive, &bytes).expect("write");
        let out = crate::process::run(
            std::process::Command::new(cpio)
                .args(["-it", "-F"])
                .arg(&archive),
            std::time::Duration::from_secs(10),
        )
        .expect("cpio -it");
        let names: Vec<&str> = out.lines().collect();
        assert_eq!(names, ["d", "d/f", "d/l"]);
    }
}
