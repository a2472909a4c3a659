//! Direct I/O throughput on one file or block device: O_DIRECT on both sides so
//! the page cache cannot flatter either the volume or the plain file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::csi::io_err;
use super::BenchError;

const MIB: usize = 1 << 20;
const SMALL: usize = 4096;

#[derive(Clone, Debug)]
pub struct IoOptions {
    /// Size of the file (or the part of the device) the patterns run over.
    pub file_mib: usize,
    /// Time budget of each random pattern.
    pub random_seconds: f64,
    /// Volume and plain file take turns this many times; medians are reported,
    /// so a disk whose speed drifts from second to second favours neither.
    pub rounds: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct IoFigures {
    pub seq_write_mib_s: f64,
    pub seq_read_mib_s: f64,
    pub rand_write_mib_s: f64,
    pub rand_read_mib_s: f64,
    pub rand_write_iops: f64,
    pub rand_read_iops: f64,
}

impl IoFigures {
    /// Volume over plain file per pattern (1.0 = as fast as the plain file).
    pub fn ratio(&self, plain: &IoFigures) -> serde_json::Value {
        serde_json::json!({
            "seq_write": self.seq_write_mib_s / plain.seq_write_mib_s,
            "seq_read": self.seq_read_mib_s / plain.seq_read_mib_s,
            "rand_write": self.rand_write_mib_s / plain.rand_write_mib_s,
            "rand_read": self.rand_read_mib_s / plain.rand_read_mib_s,
        })
    }
}

impl IoFigures {
    /// The median of each figure over several rounds.
    pub fn median(rounds: &[IoFigures]) -> IoFigures {
        let m = |f: fn(&IoFigures) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            match v.len() {
                0 => 0.0,
                n if n % 2 == 1 => v[n / 2],
                n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
            }
        };
        IoFigures {
            seq_write_mib_s: m(|f| f.seq_write_mib_s),
            seq_read_mib_s: m(|f| f.seq_read_mib_s),
            rand_write_mib_s: m(|f| f.rand_write_mib_s),
            rand_read_mib_s: m(|f| f.rand_read_mib_s),
            rand_write_iops: m(|f| f.rand_write_iops),
            rand_read_iops: m(|f| f.rand_read_iops),
        }
    }
}

/// A buffer aligned for O_DIRECT, carved out of a larger Vec to avoid unsafe code.
struct Aligned {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, seed: u64) -> Aligned {
        let mut storage = vec![0u8; len + SMALL];
        let offset = storage.as_ptr().align_offset(SMALL);
        fill_pattern(&mut storage[offset..offset + len], seed);
        Aligned {
            storage,
            offset,
            len,
        }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

/// Incompressible bytes, so no layer below can shortcut zeroes.
fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x = xorshift(x);
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

fn open(path: &Path, direct: bool, device: bool) -> Result<File, BenchError> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(!device);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path).map_err(|e| io_err(path, e))
}

/// Writes `mib` MiB of incompressible data and makes it durable.
pub fn fill(path: &Path, mib: usize) -> Result<(), BenchError> {
    let device = path.metadata().is_ok_and(|m| !m.is_file());
    let f = open(path, false, device)?;
    let mut buf = vec![0u8; MIB];
    for i in 0..mib {
        fill_pattern(&mut buf, i as u64 + 1);
        f.write_all_at(&buf, (i * MIB) as u64)
            .map_err(|e| io_err(path, e))?;
    }
    f.sync_all().map_err(|e| io_err(path, e))
}

/// A pod's 4 KiB made durable on a block volume: written at offset 0 of the
/// device, past the page cache (O_DIRECT), and flushed.
pub fn write_and_fsync_device(device: &Path) -> Result<(), BenchError> {
    let f = open(device, true, true)?;
    f.write_all_at(Aligned::new(SMALL, 3).get(), 0)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err(device, e))
}

fn rate(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

/// Runs the four patterns on `path`; `device` means a block device already there.
pub fn measure(path: &Path, device: bool, o: &IoOptions) -> Result<IoFigures, BenchError> {
    let f = open(path, true, device)?;
    let size = o.file_mib * MIB;
    let e = |err| io_err(path, err);

    let mut big = Aligned::new(MIB, 7);
    let start = Instant::now();
    for i in 0..o.file_mib {
        f.write_all_at(big.get(), (i * MIB) as u64).map_err(e)?;
    }
    f.sync_all().map_err(e)?;
    let seq_write = rate(size, start.elapsed());

    let start = Instant::now();
    for i in 0..o.file_mib {
        f.read_exact_at(big.get(), (i * MIB) as u64).map_err(e)?;
    }
    let seq_read = rate(size, start.elapsed());

    let blocks = (size / SMALL) as u64;
    let mut small = Aligned::new(SMALL, 11);
    let budget = Duration::from_secs_f64(o.random_seconds);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut run = |write: bool| -> Result<(usize, Duration), BenchError> {
        let start = Instant::now();
        let mut ops = 0usize;
        while !ops.is_multiple_of(64) || start.elapsed() < budget {
            x = xorshift(x);
            let off = (x % blocks) * SMALL as u64;
            if write {
                f.write_all_at(small.get(), off).map_err(e)?;
            } else {
                f.read_exact_at(small.get(), off).map_err(e)?;
            }
            ops += 1;
        }
        if write {
            f.sync_all().map_err(e)?;
        }
        Ok((ops, start.elapsed()))
    };
    let (w_ops, w_time) = run(true)?;
    let (r_ops, r_time) = run(false)?;
    Ok(IoFigures {
        seq_write_mib_s: seq_write,
        seq_read_mib_s: seq_read,
        rand_write_mib_s: rate(w_ops * SMALL, w_time),
        rand_read_mib_s: rate(r_ops * SMALL, r_time),
        rand_write_iops: w_ops as f64 / w_time.as_secs_f64(),
        rand_read_iops: r_ops as f64 / r_time.as_secs_f64(),
    })
}
