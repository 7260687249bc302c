//! `fs-check`: file-system semantics a build or a test run relies on that busybox cannot show,
//! run in a container on a shared folder by `tests/e2e/share-semantics.sh` (and on the host, for
//! what depends on the host's file system):
//!
//!   fs-check mmap DIR    MAP_SHARED writes reach the file (read(2) on another descriptor sees
//!                        them), MAP_PRIVATE writes do not, and a mapping sees write(2)s
//!   fs-check locks DIR   flock(2) and open-file-description locks exclude between two opens
//!                        of one file and are free again once released
//!   fs-check big DIR     a 4 GiB + 1 MiB file written at its end (past the 32-bit offset)
//!                        reads back what was written
//!   fs-check xattr DIR   user.* extended attributes: set, get, list, remove; prints
//!                        `xattr unsupported` (exit 0) when the file system refuses them with
//!                        ENOTSUP, so the caller can compare the share with the host
//!
//!   fs-check wait-line FILE LINE START_MS LIMIT_MS
//!                        polls FILE every 5 ms (no process per look, so the figure is the
//!                        event's, not the poller's) until it holds the whole line LINE; prints
//!                        how long after START_MS (ms since the epoch) that was; fails when it
//!                        was later than LIMIT_MS, or not there within ten times that
//!
//! Prints `fs-check: ok WHAT` or fails with the first property that does not hold.

use std::ffi::{CStr, CString};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["mmap", dir] => mmap(Path::new(dir)).map(String::from),
        ["locks", dir] => locks(Path::new(dir)).map(String::from),
        ["big", dir] => big(Path::new(dir)).map(String::from),
        ["xattr", dir] => xattr(Path::new(dir)).map(String::from),
        ["wait-line", file, line, start, limit] => wait_line(Path::new(file), line, start, limit),
        _ => Err(anyhow::anyhow!(
            "usage: fs-check mmap|locks|big|xattr DIR | fs-check wait-line FILE LINE START_MS LIMIT_MS"
        )),
    };
    match result {
        Ok(what) => println!("fs-check: ok {what}"),
        Err(e) => {
            eprintln!("fs-check: error: {e:#}");
            std::process::exit(1);
        }
    }
}

const PAGE: usize = 4096;

/// A mapping of `len` bytes of `file`, unmapped on drop.
struct Map {
    addr: *mut u8,
    len: usize,
}

impl Map {
    fn new(file: &File, len: usize, flags: libc::c_int) -> Result<Map> {
        // SAFETY: a fresh mapping of an open descriptor; the kernel picks the address.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap");
        }
        Ok(Map {
            addr: addr.cast(),
            len,
        })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, alive as long as `self`.
        unsafe { std::slice::from_raw_parts_mut(self.addr, self.len) }
    }

    fn sync(&self) -> Result<()> {
        // SAFETY: the whole mapping this struct owns.
        if unsafe { libc::msync(self.addr.cast(), self.len, libc::MS_SYNC) } != 0 {
            return Err(std::io::Error::last_os_error()).context("msync");
        }
        Ok(())
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

fn read_all(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("read {}", path.display()))?;
    Ok(bytes)
}

fn mmap(dir: &Path) -> Result<&'static str> {
    let path = dir.join("fs-check-mmap");
    let len = 16 * PAGE;
    let original: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    fs::write(&path, &original).context("write the file to map")?;

    // MAP_SHARED: stores reach the file.
    let file = OpenOptions::new().read(true).write(true).open(&path)?;
    let mut shared = Map::new(&file, len, libc::MAP_SHARED)?;
    ensure!(
        shared.bytes() == &original[..],
        "a shared mapping does not show the file's bytes"
    );
    for (i, b) in shared.bytes().iter_mut().enumerate().step_by(PAGE / 2) {
        *b = (i / PAGE) as u8 ^ 0xa5;
    }
    shared.sync()?;
    let mut expected = original.clone();
    for i in (0..len).step_by(PAGE / 2) {
        expected[i] = (i / PAGE) as u8 ^ 0xa5;
    }
    ensure!(
        read_all(&path)? == expected,
        "read(2) does not see what a MAP_SHARED mapping stored"
    );

    // A write(2) shows in the shared mapping.
    file.write_all_at(b"written", 3 * PAGE as u64)?;
    ensure!(
        &shared.bytes()[3 * PAGE..3 * PAGE + 7] == b"written",
        "a MAP_SHARED mapping does not see a write(2)"
    );
    expected[3 * PAGE..3 * PAGE + 7].copy_from_slice(b"written");
    drop(shared);

    // MAP_PRIVATE: stores stay in the process.
    let mut private = Map::new(&file, len, libc::MAP_PRIVATE)?;
    ensure!(
        private.bytes() == &expected[..],
        "a private mapping does not show the file's bytes"
    );
    private.bytes().fill(0xff);
    drop(private);
    ensure!(
        read_all(&path)? == expected,
        "MAP_PRIVATE stores reached the file"
    );
    fs::remove_file(&path)?;
    Ok("mmap shared and private")
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock on an open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn ofd_lock(file: &File, kind: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a zeroed flock is a valid "whole file" request once its type and whence are set.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK with a valid flock struct.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn would_block(result: std::io::Result<()>) -> bool {
    matches!(
        result.map_err(|e| e.raw_os_error()),
        Err(Some(libc::EWOULDBLOCK)) | Err(Some(libc::EACCES))
    )
}

fn locks(dir: &Path) -> Result<&'static str> {
    let path = dir.join("fs-check-lock");
    fs::write(&path, b"lock")?;
    let open = || OpenOptions::new().read(true).write(true).open(&path);
    let (a, b) = (open()?, open()?);

    flock(&a, libc::LOCK_EX | libc::LOCK_NB).context("flock the first open")?;
    ensure!(
        would_block(flock(&b, libc::LOCK_EX | libc::LOCK_NB)),
        "a second flock(LOCK_EX) was granted while the first held the lock"
    );
    flock(&a, libc::LOCK_UN).context("flock LOCK_UN")?;
    flock(&b, libc::LOCK_EX | libc::LOCK_NB).context("flock after the first released")?;
    flock(&b, libc::LOCK_UN)?;

    ofd_lock(&a, libc::F_WRLCK).context("F_OFD_SETLK the first open")?;
    ensure!(
        would_block(ofd_lock(&b, libc::F_WRLCK)),
        "a second write lock (F_OFD_SETLK) was granted while the first held it"
    );
    ofd_lock(&a, libc::F_UNLCK)?;
    ofd_lock(&b, libc::F_WRLCK).context("F_OFD_SETLK after the first released")?;
    drop((a, b));
    fs::remove_file(&path)?;
    Ok("flock and OFD locks exclude")
}

fn big(dir: &Path) -> Result<&'static str> {
    let path = dir.join("fs-check-big");
    let at: u64 = 4 << 30;
    let block: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(31) >> 3) as u8)
        .collect();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    file.seek(SeekFrom::Start(at))?;
    file.write_all(&block).context("write past 4 GiB")?;
    file.sync_all().context("fsync")?;
    drop(file);
    let len = fs::metadata(&path)?.len();
    ensure!(len == at + block.len() as u64, "the file is {len} bytes");
    let mut back = vec![0; block.len()];
    File::open(&path)?.read_exact_at(&mut back, at)?;
    ensure!(
        back == block,
        "the bytes past 4 GiB differ from what was written"
    );
    let mut head = [1u8; 4096];
    File::open(&path)?.read_exact_at(&mut head, 0)?;
    ensure!(
        head.iter().all(|&b| b == 0),
        "the hole does not read as zeros"
    );
    fs::remove_file(&path)?;
    Ok("a file past 4 GiB")
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).context("a path with a NUL")
}

/// The value of the extended attribute `name` of `file` (at most 256 bytes).
fn getxattr(file: &CStr, name: &CStr) -> std::io::Result<Vec<u8>> {
    let mut buf = [0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length; the kernel writes at most that.
    let got = unsafe {
        libc::getxattr(
            file.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(buf[..got as usize].to_vec())
}

fn xattr(dir: &Path) -> Result<&'static str> {
    let path = dir.join("fs-check-xattr");
    fs::write(&path, b"x")?;
    let file = c_path(&path)?;
    let name = CString::new("user.berth.check")?;
    let value = b"value with \0 a NUL";
    // SAFETY: valid C strings and a buffer of the given length.
    let set = unsafe {
        libc::setxattr(
            file.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if set != 0 {
        let e = std::io::Error::last_os_error();
        fs::remove_file(&path)?;
        if e.raw_os_error() == Some(libc::ENOTSUP) {
            return Ok("xattr unsupported");
        }
        return Err(e).context("setxattr");
    }
    let got = getxattr(&file, &name).context("getxattr")?;
    ensure!(got == value, "getxattr returned other bytes");
    let mut buf = [0u8; 256];
    // SAFETY: as above.
    let listed = unsafe { libc::listxattr(file.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    ensure!(
        listed >= 0,
        "listxattr: {}",
        std::io::Error::last_os_error()
    );
    let names: Vec<&[u8]> = buf[..listed as usize].split(|&b| b == 0).collect();
    ensure!(
        names.contains(&&b"user.berth.check"[..]),
        "listxattr does not name the attribute"
    );
    // SAFETY: as above.
    if unsafe { libc::removexattr(file.as_ptr(), name.as_ptr()) } != 0 {
        bail!("removexattr: {}", std::io::Error::last_os_error());
    }
    ensure!(
        getxattr(&file, &name).err().and_then(|e| e.raw_os_error()) == Some(libc::ENODATA),
        "the attribute is still there after removexattr"
    );
    fs::remove_file(&path)?;
    Ok("user xattrs")
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn wait_line(file: &Path, line: &str, start: &str, limit: &str) -> Result<String> {
    let start: u128 = start.parse().context("START_MS must be a number")?;
    let limit: u128 = limit.parse().context("LIMIT_MS must be a number")?;
    loop {
        let now = now_ms();
        let text = fs::read(file).unwrap_or_default();
        if text.split(|&b| b == b'\n').any(|l| l == line.as_bytes()) {
            let after = now.saturating_sub(start);
            ensure!(
                after <= limit,
                "{line:?} in {} after {after} ms, over {limit} ms",
                file.display()
            );
            return Ok(format!("{line:?} after {after} ms"));
        }
        if now.saturating_sub(start) > limit * 10 {
            bail!("no {line:?} in {} within {} ms", file.display(), limit * 10);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
