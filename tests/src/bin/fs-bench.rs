//! `fs-bench`: the file-share benchmark's workloads, the same binary on the test host and in a
//! container (its libraries are copied into the benchmark image).
//!
//!   fs-bench tree DIR [FILES]  an npm-install-like tree: unpack FILES (default 20,000) files of
//!                         1–16 KiB, ten to a directory, stat every file, read and checksum
//!                         every file, delete it
//!   fs-bench read DIR     read and checksum every file under DIR (`read-tree` phase)
//!   fs-bench seq DIR MIB  write a MIB-MiB file sequentially (fsync at the end), drop this
//!                         kernel's cached pages of it (fadvise DONTNEED), read it back
//!
//! Prints one line per phase, `fs-bench: PHASE SECONDS s`, and the checksum, so runs on different
//! file systems can be compared phase by phase and checked to have read the same bytes.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

const DEFAULT_FILES: usize = 20_000;
const FILES_PER_DIR: usize = 10;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["tree", dir] => tree(Path::new(dir), DEFAULT_FILES),
        ["tree", dir, files] => files
            .parse()
            .context("FILES must be a number")
            .and_then(|files| tree(Path::new(dir), files)),
        ["read", dir] => read_tree(Path::new(dir)),
        ["seq", dir, mib] => mib
            .parse()
            .context("MIB must be a number")
            .and_then(|mib| seq(Path::new(dir), mib)),
        _ => Err(anyhow::anyhow!(
            "usage: fs-bench tree DIR [FILES] | fs-bench read DIR | fs-bench seq DIR MIB"
        )),
    };
    if let Err(e) = result {
        eprintln!("fs-bench: error: {e:#}");
        std::process::exit(1);
    }
}

/// FNV-1a over everything read: cheap, and equal on every file system that returns the bytes.
struct Checksum(u64);

impl Checksum {
    fn new() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// File `i`'s size (1–16 KiB) and content byte, fixed so every run writes the same tree.
fn file_spec(i: usize) -> (usize, u8) {
    let size = 1024 + (i.wrapping_mul(2_654_435_761) % (15 * 1024));
    (size, (i % 251) as u8)
}

fn phase(name: &str, started: Instant) {
    println!("fs-bench: {name} {:.3} s", started.elapsed().as_secs_f64());
}

fn tree(dir: &Path, files: usize) -> Result<()> {
    if files == 0 {
        bail!("FILES must be at least 1");
    }
    let root = dir.join("fs-bench-tree");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("remove an old {}", root.display()))?;
    }
    let paths: Vec<PathBuf> = (0..files)
        .map(|i| {
            root.join(format!("pkg{:04}", i / FILES_PER_DIR))
                .join(format!("file{i:05}.js"))
        })
        .collect();

    let started = Instant::now();
    for (i, path) in paths.iter().enumerate() {
        if i % FILES_PER_DIR == 0 {
            let parent = path.parent().context("a file path has a parent")?;
            fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
        }
        let (size, byte) = file_spec(i);
        let mut file =
            fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        file.write_all(&vec![byte; size])?;
    }
    phase("unpack", started);

    let started = Instant::now();
    let mut total = 0u64;
    for path in &paths {
        total += fs::metadata(path)
            .with_context(|| format!("stat {}", path.display()))?
            .len();
    }
    phase("stat", started);

    let started = Instant::now();
    let mut sum = Checksum::new();
    let mut buf = Vec::with_capacity(16 * 1024);
    for path in &paths {
        buf.clear();
        fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut buf))
            .with_context(|| format!("read {}", path.display()))?;
        sum.add(&buf);
    }
    phase("read", started);

    // Deleted by name, as the tree was made: a directory listing taken while deleting from it
    // skips entries through a share of a tmpfs before Linux 6.6 (its offsets are positions that
    // shift as entries go), which is the listing's problem, not the deletes' to measure.
    let started = Instant::now();
    for (i, path) in paths.iter().enumerate() {
        fs::remove_file(path).with_context(|| format!("delete {}", path.display()))?;
        if i % FILES_PER_DIR == FILES_PER_DIR - 1 || i == paths.len() - 1 {
            let parent = path.parent().context("a file path has a parent")?;
            fs::remove_dir(parent).with_context(|| format!("delete {}", parent.display()))?;
        }
    }
    fs::remove_dir(&root).with_context(|| format!("delete {}", root.display()))?;
    phase("delete", started);
    println!(
        "fs-bench: tree {} files, {} KiB, checksum {:016x}",
        paths.len(),
        total / 1024,
        sum.0
    );
    Ok(())
}

fn read_tree(dir: &Path) -> Result<()> {
    fn walk(dir: &Path, sum: &mut Checksum, files: &mut usize, buf: &mut Vec<u8>) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                walk(&path, sum, files, buf)?;
            } else {
                buf.clear();
                fs::File::open(&path)
                    .and_then(|mut f| f.read_to_end(buf))
                    .with_context(|| format!("read {}", path.display()))?;
                sum.add(buf);
                *files += 1;
            }
        }
        Ok(())
    }
    let started = Instant::now();
    let (mut sum, mut files, mut buf) = (Checksum::new(), 0, Vec::new());
    walk(dir, &mut sum, &mut files, &mut buf)?;
    phase("read-tree", started);
    println!("fs-bench: read {files} files, checksum {:016x}", sum.0);
    Ok(())
}

fn seq(dir: &Path, mib: usize) -> Result<()> {
    let path = dir.join("fs-bench-seq.bin");
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
    let started = Instant::now();
    {
        let mut file =
            fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        for _ in 0..mib {
            file.write_all(&block)?;
        }
        file.sync_all().context("fsync")?;
        phase("seq-write", started);
        // Read from the file system, not from this kernel's page cache (clean after the fsync).
        // SAFETY: fadvise on an open descriptor.
        let err = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if err != 0 {
            bail!(
                "fadvise DONTNEED: {}",
                std::io::Error::from_raw_os_error(err)
            );
        }
    }
    let started = Instant::now();
    let mut file = fs::File::open(&path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0usize;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        read += n;
    }
    phase("seq-read", started);
    fs::remove_file(&path)?;
    if read != mib << 20 {
        bail!("read {read} bytes of {}", mib << 20);
    }
    println!("fs-bench: seq {mib} MiB");
    Ok(())
}
