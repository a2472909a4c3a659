//! Faults of the environment rather than of the driver: a root that fills up, data
//! removed behind the driver's back, a loop device left attached by an earlier run,
//! and a foreign mount over a publish target.

mod common;

use std::path::Path;

use common::*;
use localvol::proto::volume_capability::access_mode::Mode;
use localvol::proto::*;
use tonic::Code;

const EXT4: &[(&str, &str)] = &[("type", "loop"), ("fsType", "ext4")];

fn ext4() -> VolumeCapability {
    mount_cap_fs(Mode::SingleNodeWriter, "ext4", &[])
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn free_mib(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    (s.blocks_available() as u64 * s.fragment_size() as u64) >> 20
}

async fn list_snapshots(c: &mut Clients) -> Vec<ListSnapshotsResponseEntry_> {
    c.controller
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
}

type ListSnapshotsResponseEntry_ = list_snapshots_response::Entry;

async fn get_volume(c: &mut Clients, id: &str) -> ControllerGetVolumeResponse {
    c.controller
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("ControllerGetVolume {id}: {s:?}"))
        .into_inner()
}

fn condition_of(r: &ControllerGetVolumeResponse) -> VolumeCondition {
    r.status
        .as_ref()
        .and_then(|s| s.volume_condition.clone())
        .expect("ControllerGetVolume reports a volume_condition")
}

async fn mount_vol(c: &mut Clients, d: &Driver, id: &str, cap: VolumeCapability) {
    let (s, t) = (d.path(&format!("s-{id}")), d.path(&format!("t-{id}")));
    c.stage(id, &s, cap.clone()).await.unwrap();
    c.publish(id, &s, &t, cap, false).await.unwrap();
}

async fn unmount_vol(c: &mut Clients, d: &Driver, id: &str) {
    let (s, t) = (d.path(&format!("s-{id}")), d.path(&format!("t-{id}")));
    c.unpublish(id, &t).await.unwrap();
    c.unstage(id, &s).await.unwrap();
}

fn target(d: &Driver, id: &str) -> std::path::PathBuf {
    d.path(&format!("t-{id}"))
}

#[tokio::test]
async fn full_root_answers_resource_exhausted_and_leaves_nothing_half_made() {
    if !need_root() {
        return;
    }
    let img = ImageFs::new("ext4", 64 << 20, &["-q", "-m", "0"], "").unwrap();
    let root = img.mnt.join("root");
    let d = Driver::start_with(vec![], Some(root.clone())).await;
    let mut c = d.clients().await;
    let prealloc = [("type", "loop"), ("allocation", "preallocate")];
    let block = block_cap(Mode::SingleNodeWriter);
    eprintln!("root: {} MiB free", free_mib(&root));

    let p = c.create("p", 8 * MIB, &prealloc, block.clone()).await;
    let src = c.create("src", 16 * MIB, &[], rwo()).await;
    mount_vol(&mut c, &d, &src.volume_id, rwo()).await;
    let (n, e) = write_mib(&target(&d, &src.volume_id).join("data"), 6);
    assert!(e.is_none(), "{e:?}");
    assert_eq!(n, 6);
    // Fill the root, leaving 3 MiB: less than any of the calls below needs.
    let filler = c.create("filler", 48 * MIB, &[], rwo()).await;
    mount_vol(&mut c, &d, &filler.volume_id, rwo()).await;
    let fill = free_mib(&root).saturating_sub(3) as usize;
    let (n, e) = write_mib(&target(&d, &filler.volume_id).join("fill"), fill);
    assert!(e.is_none(), "filling {fill} MiB stopped at {n}: {e:?}");
    eprintln!("root: {} MiB free after filling", free_mib(&root));
    let volumes_before = entries(&root.join("volumes"));

    // CreateVolume: preallocation bigger than what is free.
    let r = c
        .controller
        .create_volume(create_req("big", 10 * MIB, &prealloc, block.clone()))
        .await;
    assert_code(r, Code::ResourceExhausted);
    assert_eq!(entries(&root.join("volumes")), volumes_before);
    assert_eq!(records(&root, "volumes").len(), volumes_before.len());

    // CreateSnapshot: the copy does not fit.
    assert_code(
        c.snapshot("snap", &src.volume_id).await,
        Code::ResourceExhausted,
    );
    assert!(list_snapshots(&mut c).await.is_empty());
    assert!(
        entries(&root.join("snapshots")).is_empty(),
        "{:?}",
        entries(&root.join("snapshots"))
    );
    assert!(records(&root, "snapshots").is_empty());

    // Expansion of a preallocated volume past what is free.
    assert_code(
        c.expand(&p.volume_id, 18 * MIB, None).await,
        Code::ResourceExhausted,
    );
    let got = get_volume(&mut c, &p.volume_id).await;
    assert_eq!(
        got.volume.unwrap().capacity_bytes,
        8 * MIB,
        "record unchanged"
    );
    let img_file = root.join("volumes").join(format!("{}.img", p.volume_id));
    assert_eq!(std::fs::metadata(&img_file).unwrap().len(), 8 << 20);

    // Space freed: the same calls succeed.
    unmount_vol(&mut c, &d, &filler.volume_id).await;
    c.delete(&filler.volume_id).await.unwrap();
    eprintln!(
        "root: {} MiB free after deleting the filler",
        free_mib(&root)
    );
    let big = c.create("big", 10 * MIB, &prealloc, block.clone()).await;
    let s = c.snapshot("snap", &src.volume_id).await.unwrap();
    assert!(s.ready_to_use);
    let e = c.expand(&p.volume_id, 18 * MIB, None).await.unwrap();
    assert_eq!(e.capacity_bytes, 18 * MIB);

    // A restore that does not fit leaves no partial copy behind.
    let filler = c.create("filler2", 48 * MIB, &[], rwo()).await;
    mount_vol(&mut c, &d, &filler.volume_id, rwo()).await;
    let fill = free_mib(&root).saturating_sub(3) as usize;
    let (n, e) = write_mib(&target(&d, &filler.volume_id).join("fill"), fill);
    assert!(e.is_none(), "filling {fill} MiB stopped at {n}: {e:?}");
    let volumes_before = entries(&root.join("volumes"));
    let mut restore = create_req("restored", 16 * MIB, &[], rwo());
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: s.snapshot_id.clone(),
            },
        )),
    });
    assert_code(
        c.controller.create_volume(restore.clone()).await,
        Code::ResourceExhausted,
    );
    assert_eq!(entries(&root.join("volumes")), volumes_before);
    unmount_vol(&mut c, &d, &filler.volume_id).await;
    c.delete(&filler.volume_id).await.unwrap();
    let restored = c
        .controller
        .create_volume(restore)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();

    unmount_vol(&mut c, &d, &src.volume_id).await;
    for id in [
        &p.volume_id,
        &src.volume_id,
        &big.volume_id,
        &restored.volume_id,
    ] {
        c.delete(id).await.unwrap();
    }
    c.controller
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: s.snapshot_id,
            ..Default::default()
        })
        .await
        .unwrap();
    for sub in ["volumes", "snapshots"] {
        assert!(entries(&root.join(sub)).is_empty(), "{sub} not empty");
        assert!(records(&root, sub).is_empty(), "records of {sub} remain");
    }
}

#[tokio::test]
async fn data_removed_behind_the_drivers_back_is_reported_abnormal() {
    if !need_root() {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let gone_dir = c.create("gone-dir", 16 * MIB, &[], rwo()).await.volume_id;
    let gone_img = c.create("gone-img", 64 * MIB, EXT4, ext4()).await.volume_id;
    let fine = c.create("fine", 16 * MIB, &[], rwo()).await.volume_id;
    mount_vol(&mut c, &d, &gone_dir, rwo()).await;
    mount_vol(&mut c, &d, &gone_img, ext4()).await;
    mount_vol(&mut c, &d, &fine, rwo()).await;

    let volumes = d.root.join("volumes");
    std::fs::remove_dir_all(volumes.join(&gone_dir)).unwrap();
    std::fs::remove_file(volumes.join(format!("{gone_img}.img"))).unwrap();

    for id in [&gone_dir, &gone_img] {
        let stats = c.stats(id, &target(&d, id)).await;
        let cond = stats
            .volume_condition
            .expect("NodeGetVolumeStats condition");
        assert!(cond.abnormal, "{id}: stats say normal");
        assert!(cond.message.contains(id.as_str()), "{id}: {}", cond.message);
        eprintln!("NodeGetVolumeStats {id}: {}", cond.message);
        let cond = condition_of(&get_volume(&mut c, id).await);
        assert!(cond.abnormal, "{id}: ControllerGetVolume says normal");
        assert!(cond.message.contains(id.as_str()), "{id}: {}", cond.message);
        eprintln!("ControllerGetVolume {id}: {}", cond.message);
        // Asked where it never was, the answer is still that it is not there.
        let unrelated = d.path("unrelated");
        std::fs::create_dir_all(&unrelated).unwrap();
        let r = c
            .node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: unrelated.display().to_string(),
                staging_target_path: String::new(),
            })
            .await;
        assert_code(r, tonic::Code::NotFound);
    }

    // Every other volume keeps working, old and new.
    let stats = c.stats(&fine, &target(&d, &fine)).await;
    assert!(!stats.volume_condition.unwrap().abnormal);
    assert!(!condition_of(&get_volume(&mut c, &fine).await).abnormal);
    std::fs::write(target(&d, &fine).join("f"), b"still here").unwrap();
    let new = c.create("new", 64 * MIB, EXT4, ext4()).await.volume_id;
    mount_vol(&mut c, &d, &new, ext4()).await;
    std::fs::write(target(&d, &new).join("f"), b"new").unwrap();

    // The device of the removed backing file still holds the pod's data: delete waits.
    assert_code(c.delete(&gone_img).await, tonic::Code::FailedPrecondition);

    // And the broken ones can still be torn down.
    for id in [&gone_dir, &gone_img, &fine, &new] {
        unmount_vol(&mut c, &d, id).await;
        c.delete(id).await.unwrap();
    }
    assert!(loops_below(&d.root).is_empty());
    assert!(
        entries(&d.root.join("volumes")).is_empty(),
        "volumes not empty"
    );
    assert!(records(&d.root, "volumes").is_empty(), "records remain");
}

#[tokio::test]
async fn stale_loop_device_is_reused_and_foreign_mounts_are_left_alone() {
    if !need_root() {
        return;
    }
    let mut d = Driver::start().await;
    let mut c = d.clients().await;
    let id = c.create("v", 64 * MIB, EXT4, ext4()).await.volume_id;
    let staging = d.path("staging");
    c.stage(&id, &staging, ext4()).await.unwrap();
    std::fs::write(staging.join("kept"), b"kept").unwrap();
    c.unstage(&id, &staging).await.unwrap();

    // A loop device left by an earlier boot of the driver (or someone else).
    d.terminate();
    let img = d.root.join("volumes").join(format!("{id}.img"));
    let stale = localvol::loopdev::attach(&img).unwrap();
    d.spawn().await;
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains(&stale.name) && l.contains(&id) && l.contains("found")),
        "start-up log does not say what it found:\n{log}"
    );
    let mut c = d.clients().await;
    c.stage(&id, &staging, ext4()).await.unwrap();
    let attached = loops_below(&d.root);
    assert_eq!(
        attached,
        std::slice::from_ref(&stale.name),
        "one device, reused"
    );
    assert_eq!(std::fs::read(staging.join("kept")).unwrap(), b"kept");
    c.unstage(&id, &staging).await.unwrap();
    assert!(loops_below(&d.root).is_empty(), "unstage detaches it");

    // Someone mounts a tmpfs over the publish target.
    let target = d.path("target");
    c.stage(&id, &staging, ext4()).await.unwrap();
    c.publish(&id, &staging, &target, ext4(), false)
        .await
        .unwrap();
    nix::mount::mount(
        Some("foreign-tmpfs"),
        &target,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    // The driver restarted meanwhile says what it finds there.
    d.restart_after_kill9().await;
    let mut c = d.clients().await;
    let r = c.unpublish(&id, &target).await;
    match &r {
        Err(s) => {
            assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
            assert!(s.message().contains("foreign-tmpfs"), "{}", s.message());
        }
        Ok(()) => panic!("unpublish went through a foreign mount"),
    }
    assert!(is_mounted(&target));
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let top = localvol::mount::parse_mountinfo(&text)
        .into_iter()
        .rfind(|m| m.mount_point == target)
        .unwrap();
    assert_eq!(
        top.source, "foreign-tmpfs",
        "the foreign tmpfs is still there"
    );
    // Its owner removes it: now the volume unpublishes.
    nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
    c.unpublish(&id, &target).await.unwrap();
    assert!(!is_mounted(&target));

    // A mount removed by someone else: unpublish and unstage still complete.
    c.publish(&id, &staging, &target, ext4(), false)
        .await
        .unwrap();
    nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
    c.unpublish(&id, &target).await.unwrap();
    c.unstage(&id, &staging).await.unwrap();
    assert!(loops_below(&d.root).is_empty());
    c.delete(&id).await.unwrap();
    drop(stale);
}

/// An expansion killed after growing the backing file and before its record is
/// completed by its retry, on a root with room for the growth once: the file's
/// new size is not counted a second time against the room.
#[tokio::test]
async fn an_expansion_killed_after_growing_is_completed_on_a_tight_root() {
    if !need_root() {
        return;
    }
    let img = ImageFs::new("ext4", 96 << 20, &["-q", "-m", "0"], "").unwrap();
    let root = img.mnt.join("root");
    let mut d = Driver::start_with(vec![], Some(root.clone())).await;
    let mut c = d.clients().await;
    let v = c.create("v", 32 * MIB, EXT4, ext4()).await;
    let free = |c: &mut Clients| {
        let mut ctl = c.controller.clone();
        async move {
            ctl.get_capacity(GetCapacityRequest::default())
                .await
                .unwrap()
                .into_inner()
                .available_capacity
        }
    };
    let before = free(&mut c).await;
    // Room for the growth (32 MiB more), not for it twice.
    assert!(before > 32 * MIB && before < 64 * MIB, "{before}");
    // Not for any xfs volume (300 MiB at least): the class has no room here.
    let xfs_class = GetCapacityRequest {
        parameters: [("type", "loop"), ("fsType", "xfs")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let r = c
        .controller
        .get_capacity(xfs_class)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.available_capacity, 0);
    // Nor when the class names xfs in the provisioner's own key: Kubernetes asks
    // GetCapacity with the class's parameters as they are and no capabilities,
    // and CreateVolume then gets xfs in the capability.
    let prefixed = GetCapacityRequest {
        parameters: [("type", "loop"), ("csi.storage.k8s.io/fstype", "xfs")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let r = c
        .controller
        .get_capacity(prefixed)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.available_capacity, 0);
    let mut c = arm(&mut d, "expand.after_grow").await;
    let r = c.expand(&v.volume_id, 64 * MIB, None).await.map(|_| ());
    let mut c = recover(&mut d, r, "expand.after_grow").await;
    let e = c.expand(&v.volume_id, 64 * MIB, None).await.unwrap();
    assert_eq!(e.capacity_bytes, 64 * MIB);
    assert_eq!(free(&mut c).await, before - 32 * MIB);
    c.delete(&v.volume_id).await.unwrap();
}
