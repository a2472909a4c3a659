//! `localvol status | volumes | snapshots`: what this node holds, read straight from
//! the driver's root and the kernel's mount table, so it works with the driver
//! stopped. It never writes: records are parsed in place, not through `store`
//! (whose open tidies the directory).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backend::{DirLimits, Layout};
use crate::inspect::{self, Budget, LoopDevice};
use crate::mount::{self, MountEntry};
use crate::params::VolumeType;
use crate::store::{SnapshotRecord, VolumeRecord};

/// Files one volume's `used` figure may stat before it is shown as a lower bound.
pub const USED_WALK_BUDGET: u64 = 1_000_000;

const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "driver root {0} does not exist; pass the --root the driver runs with \
         (its default is /var/lib/localvol)"
    )]
    NoRoot(PathBuf),
    #[error(
        "{0} is not a localvol root (it has no state/volumes directory); pass the --root \
         the driver runs with, or start the driver once to create it"
    )]
    NotARoot(PathBuf),
    #[error("cannot read {path}: {source}; run as root (the driver root is root-only)")]
    Denied { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_error(path: &Path, source: io::Error) -> StatusError {
    let path = path.to_path_buf();
    match source.kind() {
        io::ErrorKind::PermissionDenied => StatusError::Denied { path, source },
        io::ErrorKind::NotFound => StatusError::NoRoot(path),
        _ => StatusError::Io { path, source },
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct VolumeRow {
    pub id: String,
    /// `namespace/name` of the PVC, when the provisioner passed them.
    pub pvc: Option<String>,
    #[serde(rename = "type")]
    pub volume_type: String,
    pub shared: bool,
    pub size_bytes: u64,
    /// Bytes the data occupies on the root (du of a directory, allocated blocks of a
    /// loop backing file); None when the data is missing.
    pub used_bytes: Option<u64>,
    /// False when the walk stopped at its budget or could not enter part of the
    /// tree: `used_bytes` is a lower bound.
    pub used_complete: bool,
    /// What it may still write beyond `used_bytes` where its size is a promise
    /// (a loop volume, a limited directory): GetCapacity keeps it back.
    pub promised_bytes: u64,
    pub staged_at: Vec<PathBuf>,
    pub published_at: Vec<PathBuf>,
    /// Loop devices attached to the backing file.
    pub loop_devices: Vec<String>,
    pub snapshots: usize,
    /// Empty when healthy.
    pub problems: Vec<String>,
    /// The record as the driver keeps it (in its slot file): parameters,
    /// capabilities, attachments, content source.
    pub record: VolumeRecord,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRow {
    pub id: String,
    pub source_volume_id: String,
    #[serde(rename = "type")]
    pub volume_type: String,
    pub size_bytes: u64,
    pub created_unix: i64,
    /// False while a full copy is still being written to disk.
    pub ready: bool,
    pub problems: Vec<String>,
    /// The record as the driver keeps it.
    pub record: SnapshotRecord,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub root: PathBuf,
    pub capacity_bytes: Option<u64>,
    pub free_bytes: Option<u64>,
    /// Room the volumes may still write (the sum of their `promised_bytes`).
    pub promised_bytes: u64,
    /// Free less promised: what GetCapacity answers for this root's classes.
    pub available_bytes: Option<u64>,
    pub volumes: usize,
    pub snapshots: usize,
    pub staged: usize,
    pub published: usize,
    pub loop_devices: usize,
    /// Deleted volumes and snapshots whose data is still being removed; their
    /// space is not free yet.
    pub trash: usize,
    /// Every health problem found, each naming its volume, snapshot or record.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub summary: Summary,
    pub volumes: Vec<VolumeRow>,
    pub snapshots: Vec<SnapshotRow>,
}

/// Reads the records of a table: its slot file, and `*.json` files a driver of an
/// earlier version left (moved into the slots at its next start); unreadable ones
/// become problems. Sorted by id.
fn read_records<T: DeserializeOwned>(
    dir: &Path,
    problems: &mut Vec<String>,
) -> Result<Vec<T>, StatusError> {
    let mut out = BTreeMap::new();
    let slot_file = dir.join(crate::store::SLOT_FILE);
    let slotted = crate::store::slots::read(&slot_file, crate::store::id_of)
        .map_err(|e| io_error(&slot_file, e))?;
    for d in slotted.damaged {
        problems.push(format!(
            "record {} in slot {} of {} is damaged (its checksum fails); the driver keeps \
             the data it may describe",
            d.id.as_deref().unwrap_or("(id illegible)"),
            d.slot,
            slot_file.display()
        ));
    }
    for l in slotted.records {
        match serde_json::from_slice::<T>(&l.payload) {
            Ok(r) => {
                out.insert(l.id, r);
            }
            Err(e) => problems.push(format!(
                "record {} in {} is unreadable ({e}); the driver ignores it",
                l.id,
                slot_file.display()
            )),
        }
    }
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out.into_values().collect()),
        Err(e) => return Err(io_error(dir, e)),
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter(|p| !p.ends_with(crate::store::TOO_OLD_GUARD))
        .collect();
    paths.sort();
    for p in paths {
        match fs::read(&p).map_err(|e| e.to_string()).and_then(|b| {
            let id = crate::store::id_of(&b).ok_or("no id")?;
            Ok((
                id,
                serde_json::from_slice::<T>(&b).map_err(|e| e.to_string())?,
            ))
        }) {
            Ok((id, r)) => {
                out.insert(id, r);
            }
            Err(e) => problems.push(format!(
                "record {} is unreadable ({e}); the driver ignores it",
                p.display()
            )),
        }
    }
    Ok(out.into_values().collect())
}

/// Kubelet's layout tells a publish (a pod's path) from a stage (the global path).
fn is_publish_path(p: &Path) -> bool {
    let s = p.to_string_lossy();
    s.contains("/pods/") || s.contains("/volumeDevices/publish/")
}

/// The mounts showing a volume's data: binds of a directory, or mounts of (and
/// device binds of) a loop device attached to the backing file.
fn mounts_of_volume<'a>(
    table: &'a [MountEntry],
    data: &Path,
    t: VolumeType,
    loops: &[&LoopDevice],
) -> Vec<&'a MountEntry> {
    if t == VolumeType::Dir {
        return match mount::key_of_in(table, data) {
            Ok(key) => table
                .iter()
                .filter(|m| m.key() == key && m.mount_point != data)
                .collect(),
            Err(_) => vec![],
        };
    }
    table
        .iter()
        .filter(|m| {
            loops.iter().any(|l| {
                m.dev == l.dev
                    || m.source == format!("/dev/{}", l.name)
                    || (m.fs_type == "devtmpfs" && m.root == Path::new("/").join(&l.name))
            })
        })
        .collect()
}

fn volume_row(
    rec: &VolumeRecord,
    layout: &Layout,
    table: &[MountEntry],
    loops: &[LoopDevice],
    limits: &DirLimits,
    snapshots: usize,
) -> VolumeRow {
    let data = layout.volume_data(&rec.id, rec.volume_type, rec.shared);
    let data = fs::canonicalize(&data).unwrap_or(data);
    let mut problems = vec![];
    match fs::symlink_metadata(&data) {
        Ok(m) if m.is_dir() == (rec.volume_type == VolumeType::Dir) => {
            let readable = if m.is_dir() {
                fs::read_dir(&data).map(|_| ())
            } else {
                fs::File::open(&data).map(|_| ())
            };
            if let Err(e) = readable {
                problems.push(format!("data {} is unreadable: {e}", data.display()));
            }
        }
        Ok(_) => problems.push(format!("data {} has the wrong file type", data.display())),
        Err(e) => problems.push(format!("data {} is missing: {e}", data.display())),
    }
    let my_loops: Vec<&LoopDevice> = loops.iter().filter(|l| l.backing_file == data).collect();
    let (mut staged_at, mut published_at) = (vec![], vec![]);
    for m in mounts_of_volume(table, &data, rec.volume_type, &my_loops) {
        // A mount whose directory cannot be stat'ed (ENOTCONN, EIO) serves no pod.
        if let Err(e) = fs::metadata(&m.mount_point) {
            problems.push(format!("mount {} is broken: {e}", m.mount_point.display()));
        }
        if is_publish_path(&m.mount_point) {
            published_at.push(m.mount_point.clone());
        } else {
            staged_at.push(m.mount_point.clone());
        }
    }
    if rec.volume_type == VolumeType::Loop && !staged_at.is_empty() && my_loops.is_empty() {
        problems.push("staged but no loop device is attached to its backing file".into());
    }
    let used = inspect::used_bytes(&data, rec.volume_type, &mut Budget(USED_WALK_BUDGET));
    let pvc = match (
        rec.parameters.get(PVC_NAMESPACE),
        rec.parameters.get(PVC_NAME),
    ) {
        (Some(ns), Some(n)) => Some(format!("{ns}/{n}")),
        (None, Some(n)) => Some(n.clone()),
        _ => None,
    };
    VolumeRow {
        id: rec.id.clone(),
        pvc,
        volume_type: inspect::type_name(rec.volume_type),
        shared: rec.shared,
        size_bytes: rec.capacity_bytes,
        used_bytes: used.map(|u| u.bytes),
        used_complete: used.is_none_or(|u| u.complete),
        promised_bytes: crate::promises::promise(rec, &data, limits),
        staged_at,
        published_at,
        loop_devices: my_loops
            .iter()
            .map(|l| format!("/dev/{}", l.name))
            .collect(),
        snapshots,
        problems,
        record: rec.clone(),
    }
}

/// Everything `status` shows about the root at `root`.
pub fn inspect(root: &Path) -> Result<Report, StatusError> {
    let meta = fs::metadata(root).map_err(|e| io_error(root, e))?;
    if !meta.is_dir() {
        return Err(StatusError::NotARoot(root.to_path_buf()));
    }
    let layout = Layout {
        root: root.to_path_buf(),
        shared_root: None,
    };
    let state = layout.state_dir();
    let vol_dir = state.join("volumes");
    match fs::metadata(&vol_dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(StatusError::NotARoot(root.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StatusError::NotARoot(root.to_path_buf()))
        }
        Err(e) => return Err(io_error(&vol_dir, e)),
    }
    let mut problems = vec![];
    let volumes: Vec<VolumeRecord> = read_records(&vol_dir, &mut problems)?;
    let snapshots: Vec<SnapshotRecord> = read_records(&state.join("snapshots"), &mut problems)?;
    let table = mount::mounts().unwrap_or_default();
    let loops = inspect::loop_devices_under(root);
    // Read only: `false` never turns btrfs quotas on.
    let limits = DirLimits::detect(root, false).unwrap_or(DirLimits::None { why: String::new() });
    let mut snaps_of: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &snapshots {
        *snaps_of.entry(s.source_volume_id.as_str()).or_default() += 1;
    }
    let rows: Vec<VolumeRow> = volumes
        .iter()
        .map(|v| {
            let n = snaps_of.get(v.id.as_str()).copied().unwrap_or(0);
            volume_row(v, &layout, &table, &loops, &limits, n)
        })
        .collect();
    let snap_rows: Vec<SnapshotRow> = snapshots
        .iter()
        .map(|s| {
            let data = layout.snapshot_data(&s.id, s.volume_type);
            let problems = match fs::symlink_metadata(&data) {
                Ok(_) => vec![],
                Err(e) => vec![format!("data {} is missing: {e}", data.display())],
            };
            SnapshotRow {
                id: s.id.clone(),
                source_volume_id: s.source_volume_id.clone(),
                volume_type: inspect::type_name(s.volume_type),
                size_bytes: s.size_bytes,
                created_unix: s.created_unix,
                ready: s.ready(),
                problems,
                record: s.clone(),
            }
        })
        .collect();
    for r in &rows {
        problems.extend(r.problems.iter().map(|p| format!("volume {}: {p}", r.id)));
    }
    for s in &snap_rows {
        problems.extend(s.problems.iter().map(|p| format!("snapshot {}: {p}", s.id)));
    }
    let usage = mount::usage(root).ok();
    let promised = rows.iter().map(|r| r.promised_bytes).sum::<u64>();
    Ok(Report {
        summary: Summary {
            root: root.to_path_buf(),
            capacity_bytes: usage.map(|u| u.total_bytes),
            free_bytes: usage.map(|u| u.available_bytes),
            promised_bytes: promised,
            available_bytes: usage.map(|u| u.available_bytes.saturating_sub(promised)),
            volumes: rows.len(),
            snapshots: snap_rows.len(),
            staged: rows.iter().filter(|r| !r.staged_at.is_empty()).count(),
            published: rows.iter().filter(|r| !r.published_at.is_empty()).count(),
            loop_devices: loops.len(),
            trash: fs::read_dir(layout.trash_dir()).map_or(0, |d| d.count()),
            problems,
        },
        volumes: rows,
        snapshots: snap_rows,
    })
}

/// `1.5 GiB`, `64 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    let n = format!("{v:.1}");
    format!("{} {}", n.strip_suffix(".0").unwrap_or(&n), UNITS[u])
}

/// Left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

fn paths(ps: &[PathBuf]) -> String {
    if ps.is_empty() {
        "-".into()
    } else {
        ps.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn health(problems: &[String]) -> String {
    match problems.len() {
        0 => "ok".into(),
        1 => problems[0].clone(),
        n => format!("{} (+{} more)", problems[0], n - 1),
    }
}

pub fn volumes_table(rows: &[VolumeRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.pvc.clone().unwrap_or_else(|| "-".into()),
                if r.shared {
                    format!("{} (shared)", r.volume_type)
                } else {
                    r.volume_type.clone()
                },
                human_bytes(r.size_bytes),
                match r.used_bytes {
                    Some(b) if r.used_complete => human_bytes(b),
                    Some(b) => format!(">={}", human_bytes(b)),
                    None => "-".into(),
                },
                r.snapshots.to_string(),
                health(&r.problems),
                paths(&r.staged_at),
                paths(&r.published_at),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "PVC",
            "TYPE",
            "SIZE",
            "USED",
            "SNAPS",
            "HEALTH",
            "STAGED",
            "PUBLISHED",
        ],
        &rows,
    )
}

pub fn snapshots_table(rows: &[SnapshotRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.source_volume_id.clone(),
                s.volume_type.clone(),
                human_bytes(s.size_bytes),
                s.created_unix.to_string(),
                if s.ready { "yes" } else { "syncing" }.to_string(),
                health(&s.problems),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "SOURCE VOLUME",
            "TYPE",
            "SIZE",
            "CREATED (UNIX)",
            "READY",
            "HEALTH",
        ],
        &rows,
    )
}

pub fn summary_text(s: &Summary) -> String {
    let opt = |v: Option<u64>| v.map(human_bytes).unwrap_or_else(|| "unknown".into());
    let mut out = format!(
        "root:         {}\ncapacity:     {}\nfree:         {}\npromised:     {} (room volumes may still write)\n\
         available:    {} (free less promised, as GetCapacity reports it)\nvolumes:      {} ({} staged, {} published)\n\
         snapshots:    {}\nloop devices: {}\ntrash:        {} deleted, being removed\n",
        s.root.display(),
        opt(s.capacity_bytes),
        opt(s.free_bytes),
        human_bytes(s.promised_bytes),
        opt(s.available_bytes),
        s.volumes,
        s.staged,
        s.published,
        s.snapshots,
        s.loop_devices,
        s.trash,
    );
    if s.problems.is_empty() {
        out.push_str("health:       ok\n");
    } else {
        out.push_str(&format!("health:       {} problem(s)\n", s.problems.len()));
        for p in &s.problems {
            out.push_str(&format!("  - {p}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_columns() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes((252 << 30) + 1000), "252 GiB");
        let t = table(&["A", "B"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     B\nlong  x\n");
        assert!(is_publish_path(Path::new(
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount"
        )));
        assert!(!is_publish_path(Path::new(
            "/var/lib/kubelet/plugins/kubernetes.io/csi/d/h/globalmount"
        )));
    }
}
