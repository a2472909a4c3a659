//! Snapshots, restores and clones with real data, for every volume kind, and
//! instant snapshots where the root's filesystem shares blocks.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Instant;

use common::*;
use localvol::proto::volume_capability::access_mode::Mode;
use localvol::proto::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use localvol::proto::*;
use tonic::Code;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Dir,
    Ext4,
    Xfs,
    Block,
}

impl Kind {
    fn params(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Kind::Dir => vec![],
            Kind::Ext4 => vec![("type", "loop"), ("fsType", "ext4")],
            Kind::Xfs => vec![("type", "loop"), ("fsType", "xfs")],
            Kind::Block => vec![("type", "loop")],
        }
    }
    fn cap(self) -> VolumeCapability {
        match self {
            Kind::Block => block_cap(Mode::SingleNodeWriter),
            _ => mount_cap(Mode::SingleNodeWriter),
        }
    }
    fn size(self) -> i64 {
        // xfs wants 300 MiB at least; files are sparse.
        if self == Kind::Xfs {
            320 * MIB
        } else {
            64 * MIB
        }
    }
}

/// A volume in use: created, staged and published under the driver's dir.
struct Mounted {
    id: String,
    staging: std::path::PathBuf,
    target: std::path::PathBuf,
}

async fn create_from(
    c: &mut Clients,
    name: &str,
    kind: Kind,
    bytes: i64,
    source: Option<SourceType>,
) -> Result<Volume, tonic::Status> {
    let mut req = create_req(name, bytes, &kind.params(), kind.cap());
    req.volume_content_source = source.map(|t| VolumeContentSource { r#type: Some(t) });
    c.controller
        .create_volume(req)
        .await
        .map(|r| r.into_inner().volume.unwrap())
}

async fn mount(c: &mut Clients, d: &Driver, id: &str, kind: Kind) -> Mounted {
    let m = Mounted {
        id: id.to_string(),
        staging: d.path(&format!("staging-{id}")),
        target: d.path(&format!("target-{id}")),
    };
    c.stage(id, &m.staging, kind.cap()).await.unwrap();
    c.publish(id, &m.staging, &m.target, kind.cap(), false)
        .await
        .unwrap();
    m
}

async fn unmount(c: &mut Clients, m: &Mounted) {
    c.unpublish(&m.id, &m.target).await.unwrap();
    c.unstage(&m.id, &m.staging).await.unwrap();
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..(3 << 20) as u32)
        .map(|i| (i.wrapping_mul(31) as u8) ^ seed)
        .collect()
}

/// Writes the pattern as a file (mount volumes) or at 1 MiB into the device.
fn write_data(kind: Kind, m: &Mounted, data: &[u8]) {
    if kind == Kind::Block {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&m.target)
            .unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    } else {
        std::fs::create_dir_all(m.target.join("sub")).unwrap();
        std::fs::write(m.target.join("sub/data"), data).unwrap();
        std::fs::File::open(m.target.join("sub/data"))
            .unwrap()
            .sync_all()
            .unwrap();
    }
}

fn read_data(kind: Kind, m: &Mounted) -> Vec<u8> {
    if kind == Kind::Block {
        let mut f = std::fs::File::open(&m.target).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        let mut b = vec![0u8; 3 << 20];
        f.read_exact(&mut b).unwrap();
        b
    } else {
        std::fs::read(m.target.join("sub/data")).unwrap()
    }
}

fn from_snapshot(id: &str) -> Option<SourceType> {
    Some(SourceType::Snapshot(SnapshotSource {
        snapshot_id: id.into(),
    }))
}

fn from_volume(id: &str) -> Option<SourceType> {
    Some(SourceType::Volume(VolumeSource {
        volume_id: id.into(),
    }))
}

/// Snapshot, change, restore (larger), clone, delete the source, restore again,
/// delete the snapshot: data compared byte for byte at every step.
async fn story(kind: Kind) {
    if !need_root() {
        return;
    }
    let mut d = Driver::start().await;
    let mut c = d.clients().await;
    let size = kind.size();
    let src = c.create("source", size, &kind.params(), kind.cap()).await;
    let m = mount(&mut c, &d, &src.volume_id, kind).await;
    let original = pattern(1);
    write_data(kind, &m, &original);
    let df = |p: &Path| {
        let s = nix::sys::statvfs::statvfs(p).unwrap();
        s.blocks() as u64 * s.fragment_size() as u64
    };
    let source_total = df(&m.target);

    let snap = match c.snapshot("snap", &src.volume_id).await {
        // A raw device a pod may be writing is copied only in one step (shared
        // blocks), which this root cannot do: unpublished, it is copied.
        Err(s) if kind == Kind::Block && s.code() == Code::FailedPrecondition => {
            assert!(s.message().contains("raw block device"), "{}", s.message());
            c.unpublish(&m.id, &m.target).await.unwrap();
            let snap = c.snapshot("snap", &src.volume_id).await.unwrap();
            c.publish(&m.id, &m.staging, &m.target, kind.cap(), false)
                .await
                .unwrap();
            snap
        }
        r => r.unwrap(),
    };
    assert!(snap.ready_to_use);
    assert_eq!(snap.source_volume_id, src.volume_id);
    assert_eq!(snap.size_bytes, size);
    assert!(snap.creation_time.is_some());
    // Retried: the same snapshot.
    let again = c.snapshot("snap", &src.volume_id).await.unwrap();
    assert_eq!(again.snapshot_id, snap.snapshot_id);
    assert_eq!(again.creation_time, snap.creation_time);
    // The source stays writable after the freeze.
    let changed = pattern(2);
    write_data(kind, &m, &changed);

    // Restore into a larger volume: the old data.
    let restored = create_from(
        &mut c,
        "restored",
        kind,
        size + 64 * MIB,
        from_snapshot(&snap.snapshot_id),
    )
    .await
    .unwrap();
    assert_eq!(restored.capacity_bytes, size + 64 * MIB);
    assert!(matches!(
        restored
            .content_source
            .as_ref()
            .and_then(|s| s.r#type.clone()),
        Some(SourceType::Snapshot(_))
    ));
    let r = mount(&mut c, &d, &restored.volume_id, kind).await;
    assert!(
        read_data(kind, &r) == original,
        "restore holds the snapshot's data"
    );
    if kind == Kind::Ext4 || kind == Kind::Xfs {
        let total = df(&r.target);
        assert!(
            total >= source_total + 48 * MIB as u64,
            "filesystem grown to the larger volume: {source_total} -> {total}"
        );
    }

    // Clone the (changed) source.
    let clone = match create_from(&mut c, "clone", kind, size, from_volume(&src.volume_id)).await {
        Err(s) if kind == Kind::Block && s.code() == Code::FailedPrecondition => {
            c.unpublish(&m.id, &m.target).await.unwrap();
            let clone = create_from(&mut c, "clone", kind, size, from_volume(&src.volume_id))
                .await
                .unwrap();
            c.publish(&m.id, &m.staging, &m.target, kind.cap(), false)
                .await
                .unwrap();
            clone
        }
        r => r.unwrap(),
    };
    let cm = mount(&mut c, &d, &clone.volume_id, kind).await;
    assert!(
        read_data(kind, &cm) == changed,
        "clone holds the source's data"
    );

    // Errors.
    assert_code(
        create_from(
            &mut c,
            "small",
            kind,
            size - MIB,
            from_snapshot(&snap.snapshot_id),
        )
        .await,
        Code::OutOfRange,
    );
    assert_code(
        create_from(
            &mut c,
            "nosnap",
            kind,
            size,
            from_snapshot("snap-00000000000000000000000000000000"),
        )
        .await,
        Code::NotFound,
    );
    assert_code(
        create_from(
            &mut c,
            "novol",
            kind,
            size,
            from_volume("vol-00000000000000000000000000000000"),
        )
        .await,
        Code::NotFound,
    );
    assert_code(
        c.snapshot("orphan", "vol-00000000000000000000000000000000")
            .await,
        Code::NotFound,
    );
    let other = c.create("other", MIB, &[], rwo()).await;
    assert_code(
        c.snapshot("snap", &other.volume_id).await,
        Code::AlreadyExists,
    );

    // The snapshot outlives its source, and a crash.
    unmount(&mut c, &m).await;
    c.delete(&src.volume_id).await.unwrap();
    d.restart_after_kill9().await;
    let mut c = d.clients().await;
    let second = create_from(
        &mut c,
        "second",
        kind,
        size,
        from_snapshot(&snap.snapshot_id),
    )
    .await
    .unwrap();
    let sm = mount(&mut c, &d, &second.volume_id, kind).await;
    assert!(read_data(kind, &sm) == original);

    // Deleting the snapshot leaves what was restored from it alone.
    let del = |id: &str| DeleteSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    c.controller
        .delete_snapshot(del(&snap.snapshot_id))
        .await
        .unwrap();
    c.controller
        .delete_snapshot(del(&snap.snapshot_id))
        .await
        .unwrap();
    assert!(read_data(kind, &r) == original);
    assert!(read_data(kind, &sm) == original);

    for v in [&r, &cm, &sm] {
        unmount(&mut c, v).await;
        c.delete(&v.id).await.unwrap();
    }
    assert!(std::fs::read_dir(d.root.join("snapshots"))
        .unwrap()
        .next()
        .is_none());
}

#[tokio::test]
async fn dir_snapshot_restore_clone() {
    story(Kind::Dir).await;
}

#[tokio::test]
async fn ext4_snapshot_restore_clone() {
    story(Kind::Ext4).await;
}

#[tokio::test]
async fn xfs_snapshot_restore_clone() {
    story(Kind::Xfs).await;
}

#[tokio::test]
async fn block_snapshot_restore_clone() {
    story(Kind::Block).await;
}

#[tokio::test]
async fn list_snapshots_filters_and_pages() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let a = c.create("a", MIB, &[], rwo()).await.volume_id;
    let b = c.create("b", MIB, &[], rwo()).await.volume_id;
    let mut ids = vec![];
    for (name, src) in [("s1", &a), ("s2", &a), ("s3", &b)] {
        ids.push(c.snapshot(name, src).await.unwrap().snapshot_id);
    }
    let list = |snapshot_id: &str, source: &str, token: &str, max: i32| ListSnapshotsRequest {
        snapshot_id: snapshot_id.into(),
        source_volume_id: source.into(),
        starting_token: token.into(),
        max_entries: max,
        ..Default::default()
    };
    let all = c
        .controller
        .list_snapshots(list("", "", "", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 3);
    let of_a = c
        .controller
        .list_snapshots(list("", &a, "", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(of_a.entries.len(), 2);
    // Pages of one, of one source.
    let mut token = String::new();
    let mut seen_a = vec![];
    loop {
        let page = c
            .controller
            .list_snapshots(list("", &a, &token, 1))
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 1);
        for e in page.entries {
            let snap = e.snapshot.unwrap();
            assert_eq!(snap.source_volume_id, a);
            seen_a.push(snap.snapshot_id);
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let mut want_a = ids[..2].to_vec();
    want_a.sort();
    assert_eq!(seen_a, want_a);
    let one = c
        .controller
        .list_snapshots(list(&ids[2], "", "", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.entries.len(), 1);
    let none = c
        .controller
        .list_snapshots(list("snap-00000000000000000000000000000000", "", "", 0))
        .await
        .unwrap()
        .into_inner();
    assert!(none.entries.is_empty());
    let bogus = c
        .controller
        .list_snapshots(list("../../etc", "", "", 0))
        .await
        .unwrap()
        .into_inner();
    assert!(bogus.entries.is_empty());
    // Pages of one.
    let mut seen = vec![];
    let mut token = String::new();
    loop {
        let page = c
            .controller
            .list_snapshots(list("", "", &token, 1))
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 1);
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| e.snapshot.unwrap().snapshot_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    ids.sort();
    assert_eq!(seen, ids);
    // GetSnapshot, advertised: one snapshot by id, as ListSnapshots shows it.
    let caps = c
        .controller
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let get_snapshot = controller_service_capability::rpc::Type::GetSnapshot as i32;
    assert!(
        caps.capabilities.iter().any(|c| matches!(
            &c.r#type,
            Some(controller_service_capability::Type::Rpc(r)) if r.r#type == get_snapshot
        )),
        "{caps:?}"
    );
    let get = |id: &str| GetSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    let s3 = one.entries[0].snapshot.clone().unwrap();
    let got = c
        .controller
        .get_snapshot(get(&s3.snapshot_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got, s3);
    assert_eq!(got.source_volume_id, b);
    assert!(got.ready_to_use);
    assert_code(
        c.controller.get_snapshot(get("")).await,
        Code::InvalidArgument,
    );
    for missing in ["snap-00000000000000000000000000000000", "../../etc"] {
        assert_code(
            c.controller.get_snapshot(get(missing)).await,
            Code::NotFound,
        );
    }
    assert_code(
        c.controller
            .list_snapshots(list("", "", "garbage", 1))
            .await,
        Code::Aborted,
    );
    // Snapshot class parameters are checked like StorageClass parameters.
    let bad = c
        .controller
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: a.clone(),
            name: "bad".into(),
            parameters: params(&[("compression", "zstd")]),
            ..Default::default()
        })
        .await;
    assert_code(bad, Code::InvalidArgument);
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn free_bytes(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    s.blocks_available() as u64 * s.fragment_size() as u64
}

/// On a root that shares blocks, a 1 GiB volume holding 256 MiB of data is
/// snapshotted without copying it: the time and the free space say so.
async fn instant(fs: &str, kind: Kind) {
    if !need_root() {
        return;
    }
    let img = ImageFs::new(fs, 3 << 30, &["-q"], "").expect("mount image");
    let root = img.mnt.join("root");
    let d = Driver::start_with(vec![], Some(root.clone())).await;
    let mut c = d.clients().await;
    let v = c.create("big", 1 << 30, &kind.params(), kind.cap()).await;
    let m = mount(&mut c, &d, &v.volume_id, kind).await;
    let (written, err) = write_mib(&m.target.join("blob"), 256);
    assert!(err.is_none() && written == 256);
    nix::unistd::sync();
    let free_before = free_bytes(&root);
    let t = Instant::now();
    let snap = c.snapshot_once("instant", &v.volume_id).await.unwrap();
    let took = t.elapsed();
    assert!(snap.ready_to_use, "shared blocks are durable at once");
    nix::unistd::sync();
    let used = free_before.saturating_sub(free_bytes(&root));
    let data = if kind == Kind::Dir {
        root.join("snapshots").join(&snap.snapshot_id)
    } else {
        root.join("snapshots")
            .join(format!("{}.img", snap.snapshot_id))
    };
    eprintln!(
        "{fs} root, {kind:?} volume of 1 GiB with 256 MiB written: snapshot in {took:?}, \
         root space used by it {} KiB, snapshot file allocation {} MiB (shared blocks)",
        used / 1024,
        allocated(&data) >> 20
    );
    assert!(
        used < 32 << 20,
        "the snapshot shares blocks instead of copying: {used} bytes used"
    );
    let restored = create_from(&mut c, "r", kind, 1 << 30, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    let r = mount(&mut c, &d, &restored.volume_id, kind).await;
    assert_eq!(
        std::fs::metadata(r.target.join("blob")).unwrap().len(),
        256 << 20
    );
    unmount(&mut c, &r).await;
    unmount(&mut c, &m).await;
}

/// A pod can make subvolumes inside its volume without privileges; a btrfs
/// snapshot would show them empty. The snapshot and its restore keep their data.
#[tokio::test]
async fn btrfs_snapshot_keeps_what_a_pod_put_in_subvolumes_of_its_own() {
    if !need_root() {
        return;
    }
    let img = ImageFs::new("btrfs", 1 << 30, &["-q"], "").expect("mount image");
    let root = img.mnt.join("root");
    let d = Driver::start_with(vec![], Some(root.clone())).await;
    let mut c = d.clients().await;
    let v = c
        .create("nest", 64 << 20, &Kind::Dir.params(), Kind::Dir.cap())
        .await;
    let m = mount(&mut c, &d, &v.volume_id, Kind::Dir).await;
    std::fs::write(m.target.join("top"), b"top").unwrap();
    localvol::backend::btrfs::create_subvolume(&m.target.join("inner")).unwrap();
    std::fs::write(m.target.join("inner/kept"), b"inner data").unwrap();
    let snap = c.snapshot_once("nested", &v.volume_id).await.unwrap();
    let restored = create_from(
        &mut c,
        "r",
        Kind::Dir,
        64 << 20,
        from_snapshot(&snap.snapshot_id),
    )
    .await
    .unwrap();
    // Copied into a subvolume of its own, which can carry a size limit.
    assert!(localvol::backend::btrfs::is_subvolume(
        &root.join("volumes").join(&restored.volume_id)
    ));
    let r = mount(&mut c, &d, &restored.volume_id, Kind::Dir).await;
    assert_eq!(std::fs::read(r.target.join("top")).unwrap(), b"top");
    assert_eq!(
        std::fs::read(r.target.join("inner/kept")).unwrap(),
        b"inner data",
        "the pod's subvolume was copied, not left empty"
    );
    unmount(&mut c, &r).await;
    unmount(&mut c, &m).await;
}

#[tokio::test]
async fn btrfs_root_snapshots_dir_volumes_instantly() {
    instant("btrfs", Kind::Dir).await;
}

#[tokio::test]
async fn btrfs_root_snapshots_loop_volumes_instantly() {
    instant("btrfs", Kind::Ext4).await;
}

#[tokio::test]
async fn xfs_reflink_root_snapshots_loop_volumes_instantly() {
    instant("xfs", Kind::Ext4).await;
}

/// A copy that shares no blocks is reported once cut, not yet ready; it becomes
/// ready without another call (ListSnapshots shows it), and a retried
/// CreateSnapshot returns the same snapshot.
#[tokio::test]
async fn a_full_copy_is_cut_first_and_ready_once_durable() {
    if !need_root() {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let v = c
        .create("v", 64 << 20, &[], mount_cap(Mode::SingleNodeWriter))
        .await;
    let data = d.root.join("volumes").join(&v.volume_id);
    let (written, err) = write_mib(&data.join("blob"), 32);
    assert!(err.is_none() && written == 32);
    let t = Instant::now();
    let cut = c.snapshot_once("s", &v.volume_id).await.unwrap();
    let cut_took = t.elapsed();
    // ext4 shares no blocks: the copy is reported before it is durable.
    let ext4 = nix::sys::statfs::statfs(&d.root).unwrap().filesystem_type()
        == nix::sys::statfs::EXT4_SUPER_MAGIC;
    assert!(
        !(ext4 && cut.ready_to_use),
        "a full copy on ext4 reported ready at once"
    );
    let ready_took = loop {
        let listed = c
            .controller
            .list_snapshots(ListSnapshotsRequest {
                snapshot_id: cut.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        assert_eq!(listed.len(), 1);
        if listed[0].snapshot.as_ref().unwrap().ready_to_use {
            break t.elapsed();
        }
        assert!(t.elapsed().as_secs() < 120, "never became ready");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    eprintln!(
        "32 MiB dir snapshot: reported after {cut_took:?} (ready_to_use {}), ready after {ready_took:?}",
        cut.ready_to_use
    );
    let again = c.snapshot_once("s", &v.volume_id).await.unwrap();
    assert_eq!(again.snapshot_id, cut.snapshot_id);
    assert!(again.ready_to_use);
    assert_eq!(again.creation_time, cut.creation_time, "the same cut");
    let r = create_from(
        &mut c,
        "r",
        Kind::Dir,
        64 << 20,
        from_snapshot(&cut.snapshot_id),
    )
    .await
    .unwrap();
    let restored = d.root.join("volumes").join(&r.volume_id).join("blob");
    assert_eq!(std::fs::metadata(restored).unwrap().len(), 32 << 20);
}

/// A directory volume holding `f`, and its snapshot "s" cut (recorded as not
/// yet durable) when the driver crashed; the driver is left stopped.
async fn cut_then_crash() -> (Driver, Volume, String) {
    let mut d = Driver::start().await;
    let mut c = d.clients().await;
    let v = c
        .create("v", 64 << 20, &[], mount_cap(Mode::SingleNodeWriter))
        .await;
    std::fs::write(d.root.join("volumes").join(&v.volume_id).join("f"), b"x").unwrap();
    let mut c = arm(&mut d, "snapshot.after_record").await;
    let r = c.snapshot_once("s", &v.volume_id).await.map(|_| ());
    assert!(r.is_err(), "crashed");
    d.kill9();
    let id = localvol::ids::id_for_name(localvol::ids::Kind::Snapshot, "s");
    (d, v, id)
}

/// A snapshot cut but not yet durable when the node went down (another boot id
/// in its record) may be partial: start-up discards it, and the CO's retry cuts
/// it again.
#[tokio::test]
async fn a_snapshot_not_durable_before_a_reboot_is_discarded() {
    if !need_root() {
        return;
    }
    let (mut d, v, id) = cut_then_crash().await;
    {
        // The driver is down: the test edits its record as the driver would.
        let table = localvol::store::Table::<localvol::store::SnapshotRecord>::open_slots(
            d.root.join("state/snapshots"),
        )
        .unwrap();
        let mut rec = table.get(&id).unwrap();
        assert!(rec.syncing_boot.is_some(), "cut, not durable: {rec:?}");
        rec.syncing_boot = Some("an-earlier-boot".into());
        table.put(&rec).unwrap();
    }
    d.envs.clear();
    d.spawn().await;
    let mut c = d.clients().await;
    let listed = c
        .controller
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(listed.is_empty(), "discarded: {listed:?}");
    assert!(!d.root.join("snapshots").join(&id).exists());
    assert!(d.log().contains("discarded"), "{}", d.log());
    let s = c.snapshot("s", &v.volume_id).await.unwrap();
    assert_eq!(s.snapshot_id, id);
    assert!(d.root.join("snapshots").join(&id).join("f").exists());
}

/// A cut snapshot whose copy vanished before it was durable (removed by hand)
/// is discarded, not reported ready, and the CO's retry takes it again.
#[tokio::test]
async fn a_cut_snapshot_whose_copy_vanished_is_taken_again() {
    if !need_root() {
        return;
    }
    let (mut d, v, id) = cut_then_crash().await;
    std::fs::remove_dir_all(d.root.join("snapshots").join(&id)).unwrap();
    d.envs.clear();
    d.spawn().await;
    let mut c = d.clients().await;
    let s = loop {
        match c.snapshot_once("s", &v.volume_id).await {
            Ok(s) if s.ready_to_use => break s,
            Ok(_) => {}
            Err(e) => assert_eq!(e.code(), Code::Aborted, "{e:?}"),
        }
    };
    assert_eq!(s.snapshot_id, id);
    assert!(d.root.join("snapshots").join(&id).join("f").exists());
    assert!(d.log().contains("vanished"), "{}", d.log());
}

/// A mount a privileged pod made inside its volume is not the volume's data: a
/// copy does not cross into it (FAILED_PRECONDITION, saying where), and copies
/// once it is gone.
#[tokio::test]
async fn a_copy_does_not_cross_into_a_mount_inside_the_volume() {
    if !need_root() {
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let v = c.create("with-mount", MIB, &[], rwo()).await;
    let data = d.root.join("volumes").join(&v.volume_id);
    let host = d.path("host");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("secret"), b"not the volume's").unwrap();
    std::fs::create_dir(data.join("m")).unwrap();
    nix::mount::mount(
        Some(&host),
        &data.join("m"),
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let mounted = Unmount(data.join("m"));
    let e = c
        .snapshot("s", &v.volume_id)
        .await
        .expect_err("a copy across a mount");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("mount inside"), "{}", e.message());
    assert_eq!(
        std::fs::read_dir(d.root.join("snapshots")).unwrap().count(),
        0
    );
    drop(mounted);
    let s = c.snapshot("s", &v.volume_id).await.unwrap();
    c.delete_snapshot(&s.snapshot_id).await.unwrap();
    c.delete(&v.volume_id).await.unwrap();
}

/// Sizes are whole MiB, so a claim of 20M (20,000,000 bytes) gets a volume of
/// 20 MiB. A clone or a restore asking what that claim asked is not smaller than
/// its source and is made at the source's size; a limit below it is OUT_OF_RANGE.
#[tokio::test]
async fn a_clone_asking_its_sources_unrounded_size_is_made() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let asked = 20_000_000;
    let src = c.create("src-20m", asked, &[], rwo()).await;
    assert_eq!(src.capacity_bytes, 20 * MIB);
    let snap = c.snapshot("snap-20m", &src.volume_id).await.unwrap();
    for (name, source) in [
        ("clone-20m", from_volume(&src.volume_id)),
        ("restore-20m", from_snapshot(&snap.snapshot_id)),
    ] {
        let v = create_from(&mut c, name, Kind::Dir, asked, source)
            .await
            .unwrap();
        assert_eq!(v.capacity_bytes, 20 * MIB, "{name}");
        c.delete(&v.volume_id).await.unwrap();
    }
    let mut req = create_req("limited", asked, &[], rwo());
    req.capacity_range = Some(CapacityRange {
        required_bytes: asked,
        limit_bytes: asked,
    });
    req.volume_content_source =
        from_volume(&src.volume_id).map(|t| VolumeContentSource { r#type: Some(t) });
    assert_code(c.controller.create_volume(req).await, Code::OutOfRange);
    c.delete_snapshot(&snap.snapshot_id).await.unwrap();
    c.delete(&src.volume_id).await.unwrap();

    // The same for a claim smaller than xfs allows: 64Mi became 300 MiB, and
    // its clone or restore asking 64Mi again is made at 300 MiB.
    let src = create_from(&mut c, "src-xfs", Kind::Xfs, 64 * MIB, None)
        .await
        .unwrap();
    assert_eq!(src.capacity_bytes, 300 * MIB);
    let snap = c.snapshot("snap-xfs", &src.volume_id).await.unwrap();
    for (name, source) in [
        ("clone-xfs", from_volume(&src.volume_id)),
        ("restore-xfs", from_snapshot(&snap.snapshot_id)),
    ] {
        let v = create_from(&mut c, name, Kind::Xfs, 64 * MIB, source)
            .await
            .unwrap();
        assert_eq!(v.capacity_bytes, 300 * MIB, "{name}");
        c.delete(&v.volume_id).await.unwrap();
    }
    c.delete_snapshot(&snap.snapshot_id).await.unwrap();
    c.delete(&src.volume_id).await.unwrap();
}
