//! What the disk is stored in: a raw image file, a block device, or
//! nothing (`null:SIZE`: requests complete without I/O, reads return
//! zeroes; the reference point of a benchmark of the vhost-user path alone).
//!
//! Files and block devices are opened with `O_DIRECT` where the file system
//! allows it; where it does not (tmpfs refuses the flag with `EINVAL`) the
//! image is opened buffered and a line says so. With `O_DIRECT` a second,
//! buffered descriptor serves requests whose guest buffers are not aligned
//! to the logical block size (the kernel refuses those with `EINVAL`): the
//! two are coherent, direct I/O writes back and invalidates the page cache
//! range it covers. Memory the kernel cannot pin for direct I/O (Linux
//! 6.12's VDUSE bounce buffer: `EFAULT`) makes the worker that met it go
//! buffered from then on (logged once).
//!
//! A file on a memory file system (tmpfs, ramfs, hugetlbfs) is
//! [`in_memory`](Backing::in_memory): its I/O never waits for a device, but
//! those file systems offer no non-blocking I/O (`RWF_NOWAIT` is refused),
//! so io_uring would hand every request to one of its kernel worker
//! threads. The worker reads and writes such a file itself instead.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use log::{info, warn};

/// The `--image` argument: a path, or `null:SIZE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSpec {
    /// A raw image file or a block device.
    File(PathBuf),
    /// A disk of this many bytes that stores nothing.
    Null(u64),
}

impl std::str::FromStr for ImageSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<ImageSpec, String> {
        match s.strip_prefix("null:") {
            Some(size) => parse_size(size).map(ImageSpec::Null),
            None if s.is_empty() => Err("empty image path".into()),
            None => Ok(ImageSpec::File(PathBuf::from(s))),
        }
    }
}

/// Parses a size: bytes, or with a binary suffix `K`, `M`, `G`, `T`
/// (optionally followed by `iB` or `B`). At least one sector (512 bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("not a size: {s:?} (e.g. 4096, 64M, 1G)"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {s:?} overflows"))?;
    if bytes < 512 {
        return Err(format!("size {s:?} is below one 512-byte sector"));
    }
    Ok(bytes)
}

/// An opened backing store.
#[derive(Debug)]
pub struct Backing {
    store: Store,
    /// Disk size in bytes (a multiple of 512); changes when the image is
    /// resized and [`Backing::refresh_size`] re-reads it.
    size: AtomicU64,
    blk_size: u32,
    read_only: bool,
}

#[derive(Debug)]
enum Store {
    File {
        path: PathBuf,
        /// The image as opened: `O_DIRECT` when `direct`.
        file: File,
        /// With `O_DIRECT`: a buffered descriptor for unaligned requests.
        buffered: Option<File>,
        block_device: bool,
        /// On a memory file system.
        in_memory: bool,
    },
    Null,
}

/// `BLKSSZGET`: a block device's logical block size.
const BLKSSZGET: libc::c_ulong = 0x1268;

impl Backing {
    /// Opens `spec` (read-only if `read_only`), with `O_DIRECT` when the file
    /// system allows it.
    pub fn open(spec: &ImageSpec, read_only: bool) -> std::io::Result<Backing> {
        let path = match spec {
            ImageSpec::Null(size) => {
                return Ok(Backing {
                    store: Store::Null,
                    size: AtomicU64::new(*size),
                    blk_size: 512,
                    read_only,
                })
            }
            ImageSpec::File(p) => p,
        };
        let direct = match open(path, read_only, true) {
            Ok(f) => Some(f),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                info!(
                    "{}: the file system refuses O_DIRECT ({e}); using buffered I/O",
                    path.display()
                );
                None
            }
            Err(e) => return Err(e),
        };
        let buffered = open(path, read_only, false)?;
        let meta = buffered.metadata()?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        }
        let size = store_size(&buffered, block_device)?;
        let blk_size = if block_device {
            logical_block_size(&buffered).unwrap_or(512)
        } else {
            512
        };
        if size % 512 != 0 {
            warn!(
                "{}: size {size} is not a multiple of 512; the last {} bytes are not part of the disk",
                path.display(),
                size % 512
            );
        }
        let (file, buffered) = match direct {
            Some(d) => (d, Some(buffered)),
            None => (buffered, None),
        };
        let in_memory = !block_device && on_memory_fs(&file);
        Ok(Backing {
            store: Store::File {
                path: path.clone(),
                file,
                buffered,
                block_device,
                in_memory,
            },
            size: AtomicU64::new(size - size % 512),
            blk_size,
            read_only,
        })
    }

    /// Disk size in bytes (a multiple of 512).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Reads the image's size again (a file grown or shrunk with
    /// `truncate`, a block device resized) and keeps it, rounded down to a
    /// whole sector: returns it. Requests are checked against it from then
    /// on. The null disk keeps its size.
    pub fn refresh_size(&self) -> std::io::Result<u64> {
        let Store::File {
            file, block_device, ..
        } = &self.store
        else {
            return Ok(self.size());
        };
        let size = store_size(file, *block_device)?;
        let size = size - size % 512;
        self.size.store(size, Ordering::Release);
        Ok(size)
    }

    /// Logical block size.
    pub fn blk_size(&self) -> u32 {
        self.blk_size
    }

    /// Opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The null disk.
    pub fn is_null(&self) -> bool {
        matches!(self.store, Store::Null)
    }

    /// I/O goes through `O_DIRECT` (for aligned requests).
    pub fn direct(&self) -> bool {
        matches!(
            self.store,
            Store::File {
                buffered: Some(_),
                ..
            }
        )
    }

    /// A block device rather than a file.
    pub fn is_block_device(&self) -> bool {
        matches!(
            self.store,
            Store::File {
                block_device: true,
                ..
            }
        )
    }

    /// A file on a memory file system (tmpfs, ramfs, hugetlbfs): its reads
    /// and writes never wait for a device (see the module docs).
    pub fn in_memory(&self) -> bool {
        matches!(
            self.store,
            Store::File {
                in_memory: true,
                ..
            }
        )
    }

    /// The descriptor for a request whose buffers are `aligned` (to the
    /// logical block size); `None` for the null disk.
    pub fn fd(&self, aligned: bool) -> Option<RawFd> {
        match &self.store {
            Store::File {
                file,
                buffered: Some(b),
                ..
            } if !aligned => Some(b.as_raw_fd()),
            Store::File { file, .. } => Some(file.as_raw_fd()),
            Store::Null => None,
        }
    }

    /// A description for logs.
    pub fn describe(&self) -> String {
        match &self.store {
            Store::File {
                path, block_device, ..
            } => format!(
                "{} ({}, {} bytes, block size {}, {}{})",
                path.display(),
                if *block_device {
                    "block device"
                } else {
                    "file"
                },
                self.size(),
                self.blk_size,
                if self.direct() {
                    "O_DIRECT"
                } else {
                    "buffered"
                },
                if self.read_only { ", read-only" } else { "" }
            ),
            Store::Null => format!(
                "null disk ({} bytes{})",
                self.size(),
                if self.read_only { ", read-only" } else { "" }
            ),
        }
    }
}

/// The size of the image open as `f`, in bytes.
fn store_size(f: &File, block_device: bool) -> std::io::Result<u64> {
    if block_device {
        let mut f = f;
        f.seek(SeekFrom::End(0))
    } else {
        Ok(f.metadata()?.len())
    }
}

/// True if `file` lives on tmpfs, ramfs or hugetlbfs (false if that
/// cannot be told).
fn on_memory_fs(file: &File) -> bool {
    use nix::sys::statfs::{fstatfs, FsType, HUGETLBFS_MAGIC, TMPFS_MAGIC};
    // Neither nix nor libc names ramfs (linux/magic.h: RAMFS_MAGIC).
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    fstatfs(file).is_ok_and(|s| {
        let t = s.filesystem_type();
        t == TMPFS_MAGIC || t == RAMFS_MAGIC || t == HUGETLBFS_MAGIC
    })
}

fn open(path: &Path, read_only: bool, direct: bool) -> std::io::Result<File> {
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(flags)
        .open(path)
}

fn logical_block_size(f: &File) -> Option<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at
    // `v`; the fd is open for the duration of the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKSSZGET, &mut v as *mut libc::c_int) };
    (r == 0 && v >= 512 && (v as u32).is_power_of_two()).then_some(v as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_sizes_and_specs() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("100").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("").is_err());
        assert_eq!("null:1G".parse(), Ok(ImageSpec::Null(1 << 30)));
        assert_eq!(
            "/tmp/x.img".parse(),
            Ok(ImageSpec::File(PathBuf::from("/tmp/x.img")))
        );
        assert!("null:".parse::<ImageSpec>().is_err());
    }

    #[test]
    fn test_open_file_and_null() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("disk.img");
        std::fs::write(&p, vec![0u8; 8192 + 100]).expect("image");
        let b = Backing::open(&ImageSpec::File(p.clone()), false).expect("open");
        assert_eq!(b.size(), 8192);
        assert!(b.fd(true).is_some() && b.fd(false).is_some());
        assert!(!b.is_null());
        let ro = Backing::open(&ImageSpec::File(p), true).expect("open ro");
        assert!(ro.read_only());
        let n = Backing::open(&ImageSpec::Null(1 << 20), false).expect("null");
        assert!(n.is_null() && n.fd(true).is_none());
        assert!(Backing::open(&ImageSpec::File(dir.path().to_path_buf()), true).is_err());
        assert!(Backing::open(&ImageSpec::File(dir.path().join("none")), true).is_err());
    }

    #[test]
    fn test_refresh_size_follows_the_image() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("disk.img");
        std::fs::write(&p, vec![0u8; 8192]).expect("image");
        let b = Backing::open(&ImageSpec::File(p.clone()), false).expect("open");
        assert_eq!(b.refresh_size().expect("same"), 8192);
        let f = OpenOptions::new().write(true).open(&p).expect("reopen");
        f.set_len(3 * 8192 + 100).expect("grow");
        assert_eq!(b.refresh_size().expect("grown"), 3 * 8192);
        assert_eq!(b.size(), 3 * 8192);
        f.set_len(4096).expect("shrink");
        assert_eq!(b.refresh_size().expect("shrunk"), 4096);
        let n = Backing::open(&ImageSpec::Null(1 << 20), false).expect("null");
        assert_eq!(n.refresh_size().expect("null"), 1 << 20);
    }
}
