//! Crash injection: for every crash point in the driver (`localvol::faults`), put
//! the driver in the state before the step, crash it there (SIGKILL), restart it,
//! repeat the call as Kubernetes would, check the result, then tear everything
//! down and check that nothing is orphaned: no stray data under the root, no loop
//! device, no mount.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use localvol::proto::volume_capability::access_mode::Mode;
use localvol::proto::*;

const EXT4: &[(&str, &str)] = &[("type", "loop"), ("fsType", "ext4")];
const XFS: &[(&str, &str)] = &[("type", "loop"), ("fsType", "xfs")];

fn ext4() -> VolumeCapability {
    mount_cap_fs(Mode::SingleNodeWriter, "ext4", &[])
}
fn xfs() -> VolumeCapability {
    mount_cap_fs(Mode::SingleNodeWriter, "xfs", &[])
}

fn ok<T>(r: Result<T, tonic::Status>) -> Result<(), tonic::Status> {
    r.map(|_| ())
}

/// Writes a file with a deadline: a filesystem left frozen would block forever.
async fn write_with_deadline(path: &Path, bytes: &'static [u8]) {
    let p = path.to_path_buf();
    let w = tokio::task::spawn_blocking(move || std::fs::write(p, bytes));
    tokio::time::timeout(Duration::from_secs(20), w)
        .await
        .expect("write blocked: filesystem left frozen")
        .unwrap()
        .unwrap();
}

/// Unpublishes, unstages and deletes everything the driver lists, then checks that
/// nothing of it is left anywhere.
async fn teardown_and_check(d: &Driver, c: &mut Clients, point: &str) {
    for (staging, target) in [("staging", "target")] {
        let vols = c
            .controller
            .list_volumes(ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries;
        let ids: Vec<String> = vols
            .into_iter()
            .map(|v| v.volume.unwrap().volume_id)
            .collect();
        // One target and one staging path for every volume: each call frees the
        // path of its own volume and leaves another's (FAILED_PRECONDITION).
        let mine = |r: Result<(), tonic::Status>| match r {
            Err(s)
                if s.code() == tonic::Code::FailedPrecondition
                    && s.message().contains("not of volume") =>
            {
                Ok(())
            }
            r => r,
        };
        for id in &ids {
            mine(c.unpublish(id, &d.path(target)).await).unwrap();
        }
        for id in &ids {
            mine(c.unstage(id, &d.path(staging)).await).unwrap();
        }
        for id in &ids {
            c.delete(id).await.unwrap();
        }
    }
    let snaps = c
        .controller
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    for s in snaps {
        c.delete_snapshot(&s.snapshot.unwrap().snapshot_id)
            .await
            .unwrap();
    }
    for sub in ["volumes", "snapshots"] {
        let left: Vec<_> = std::fs::read_dir(d.root.join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{point}: {sub} keeps {left:?}");
        let left = records(&d.root, sub);
        assert!(
            left.is_empty(),
            "{point}: records of {sub} remain: {left:?}"
        );
    }
    trash_emptied(&d.root).await;
    assert!(
        loops_below(&d.root).is_empty(),
        "{point}: a loop device is left"
    );
    let dir = std::fs::canonicalize(d.dir.path()).unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !localvol::mount::parse_mountinfo(&mounts)
            .iter()
            .any(|m| m.mount_point.starts_with(&dir)),
        "{point}: a mount is left"
    );
}

async fn walk(point: &str) {
    let mut d = Driver::start().await;
    let mut c = d.clients().await;
    let (staging, target) = (d.path("staging"), d.path("target"));
    match point {
        "create.after_data" | "create.after_record" => {
            let mut c = arm(&mut d, point).await;
            let r = ok(c
                .controller
                .create_volume(create_req("v", 64 * MIB, EXT4, ext4()))
                .await);
            let mut c = recover(&mut d, r, point).await;
            let v = c.create("v", 64 * MIB, EXT4, ext4()).await;
            c.stage(&v.volume_id, &staging, ext4()).await.unwrap();
            c.publish(&v.volume_id, &staging, &target, ext4(), false)
                .await
                .unwrap();
            std::fs::write(target.join("f"), b"x").unwrap();
            // And a restore crashing at the same point.
            let s = c.snapshot("s", &v.volume_id).await.unwrap();
            let mut req = create_req("r", 64 * MIB, EXT4, ext4());
            req.volume_content_source = Some(VolumeContentSource {
                r#type: Some(volume_content_source::Type::Snapshot(
                    volume_content_source::SnapshotSource {
                        snapshot_id: s.snapshot_id.clone(),
                    },
                )),
            });
            let mut c = arm(&mut d, point).await;
            let r = ok(c.controller.create_volume(req.clone()).await);
            let mut c = recover(&mut d, r, point).await;
            let restored = c.controller.create_volume(req).await.unwrap().into_inner();
            let rid = restored.volume.unwrap().volume_id;
            let (rs, rt) = (d.path("rs"), d.path("rt"));
            c.stage(&rid, &rs, ext4()).await.unwrap();
            c.publish(&rid, &rs, &rt, ext4(), false).await.unwrap();
            assert_eq!(std::fs::read(rt.join("f")).unwrap(), b"x");
            c.unpublish(&rid, &rt).await.unwrap();
            c.unstage(&rid, &rs).await.unwrap();
        }
        "delete.after_record" | "delete.in_trash" => {
            let v = c.create("v", 64 * MIB, EXT4, ext4()).await;
            c.stage(&v.volume_id, &staging, ext4()).await.unwrap();
            std::fs::write(staging.join("f"), vec![7u8; MIB as usize]).unwrap();
            c.unstage(&v.volume_id, &staging).await.unwrap();
            let mut c = arm(&mut d, point).await;
            let r = c.delete(&v.volume_id).await;
            let mut c = recover(&mut d, r, point).await;
            c.delete(&v.volume_id).await.unwrap();
            assert!(!d
                .root
                .join("volumes")
                .join(format!("{}.img", v.volume_id))
                .exists());
            // What the crash left in the trash is removed after the restart.
            trash_emptied(&d.root).await;
        }
        "snapshot.frozen"
        | "snapshot.after_copy"
        | "snapshot.after_record"
        | "snapshot.before_ready" => {
            let v = c.create("v", 64 * MIB, EXT4, ext4()).await;
            c.stage(&v.volume_id, &staging, ext4()).await.unwrap();
            c.publish(&v.volume_id, &staging, &target, ext4(), false)
                .await
                .unwrap();
            std::fs::write(target.join("f"), b"before").unwrap();
            let mut c = arm(&mut d, point).await;
            let r = ok(c.snapshot("s", &v.volume_id).await);
            let mut c = recover(&mut d, r, point).await;
            // A filesystem frozen by the crashed run was thawed at start-up.
            write_with_deadline(&target.join("g"), b"after").await;
            let s = c.snapshot("s", &v.volume_id).await.unwrap();
            assert!(s.ready_to_use);
            // Once cut (reported, not yet durable), the snapshot keeps the instant
            // it was cut at: the restart finishes that copy, never takes another.
            let cut = matches!(point, "snapshot.after_record" | "snapshot.before_ready");
            let mut req = create_req("r", 64 * MIB, EXT4, ext4());
            req.volume_content_source = Some(VolumeContentSource {
                r#type: Some(volume_content_source::Type::Snapshot(
                    volume_content_source::SnapshotSource {
                        snapshot_id: s.snapshot_id.clone(),
                    },
                )),
            });
            let restored = c.controller.create_volume(req).await.unwrap().into_inner();
            let rid = restored.volume.unwrap().volume_id;
            let (rs, rt) = (d.path("rs"), d.path("rt"));
            c.stage(&rid, &rs, ext4()).await.unwrap();
            c.publish(&rid, &rs, &rt, ext4(), false).await.unwrap();
            assert_eq!(std::fs::read(rt.join("f")).unwrap(), b"before");
            assert_eq!(rt.join("g").exists(), !cut, "{point}");
            c.unpublish(&rid, &rt).await.unwrap();
            c.unstage(&rid, &rs).await.unwrap();
        }
        "delete_snapshot.after_record" => {
            let v = c.create("v", 64 * MIB, EXT4, ext4()).await;
            let s = c.snapshot("s", &v.volume_id).await.unwrap();
            let mut c = arm(&mut d, point).await;
            let r = c.delete_snapshot(&s.snapshot_id).await;
            let mut c = recover(&mut d, r, point).await;
            c.delete_snapshot(&s.snapshot_id).await.unwrap();
        }
        "stage.after_attach" | "stage.after_format" | "stage.after_mount" => {
            let v = c.create("v", 64 * MIB, EXT4, ext4()).await;
            // Data from an earlier stage must survive a crash in a later one.
            c.stage(&v.volume_id, &staging, ext4()).await.unwrap();
            std::fs::write(staging.join("kept"), b"kept").unwrap();
            c.unstage(&v.volume_id, &staging).await.unwrap();
            let mut c = arm(&mut d, point).await;
            let r = c.stage(&v.volume_id, &staging, ext4()).await;
            let mut c = recover(&mut d, r, point).await;
            c.stage(&v.volume_id, &staging, ext4()).await.unwrap();
            assert_eq!(std::fs::read(staging.join("kept")).unwrap(), b"kept");
            assert_eq!(loops_below(&d.root).len(), 1, "attached once, never twice");
            if point == "stage.after_attach" {
                // The retry of a stage killed after attaching fails for good (it
                // asks for another filesystem): the kubelet will never unstage, so
                // the device the crash left goes with the failed retry.
                let w = c.create("w", 64 * MIB, EXT4, ext4()).await;
                let other = d.path("staging-w");
                let mut c = arm(&mut d, point).await;
                let r = c.stage(&w.volume_id, &other, ext4()).await;
                let mut c = recover(&mut d, r, point).await;
                assert_eq!(loops_below(&d.root).len(), 2, "the crash left w attached");
                assert_code(
                    c.stage(&w.volume_id, &other, xfs()).await,
                    tonic::Code::FailedPrecondition,
                );
                assert_eq!(loops_below(&d.root).len(), 1, "w's device is detached");
                c.delete(&w.volume_id).await.unwrap();

                // A block stage killed after attaching had kept its path: an
                // unstage elsewhere leaves the device, one there detaches it.
                let block = block_cap(Mode::SingleNodeWriter);
                let b = c
                    .create("b", 16 * MIB, &[("type", "loop")], block.clone())
                    .await;
                let raw = d.path("staging-b");
                let mut c = arm(&mut d, point).await;
                let r = c.stage(&b.volume_id, &raw, block).await;
                let mut c = recover(&mut d, r, point).await;
                assert_eq!(loops_below(&d.root).len(), 2, "the crash left b attached");
                c.unstage(&b.volume_id, &other).await.unwrap();
                assert_eq!(loops_below(&d.root).len(), 2, "not staged there");
                c.unstage(&b.volume_id, &raw).await.unwrap();
                assert_eq!(loops_below(&d.root).len(), 1, "b's device is detached");
                c.delete(&b.volume_id).await.unwrap();
            }
        }
        "stage.format_marked" => {
            // A volume that may hold data (made for block and filesystem access)
            // has its format announced in its record before mkfs runs.
            let mut req = create_req("v", 64 * MIB, EXT4, ext4());
            req.volume_capabilities
                .push(block_cap(Mode::SingleNodeWriter));
            let id = c.create_as(req).await.volume_id;
            let mut c = arm(&mut d, point).await;
            let r = c.stage(&id, &staging, ext4()).await;
            let mut c = recover(&mut d, r, point).await;
            // What an mkfs killed half-way leaves: bytes, and no signature yet.
            {
                use std::os::unix::fs::FileExt;
                let img = d.root.join("volumes").join(format!("{id}.img"));
                let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
                f.write_all_at(&[0x5a; 4096], 4096).unwrap();
                f.sync_all().unwrap();
            }
            // Announced, so the retry formats over it.
            c.stage(&id, &staging, ext4()).await.unwrap();
            std::fs::write(staging.join("f"), b"x").unwrap();

            // Announced, then handed out raw instead (the crash left the device
            // attached): what a pod writes there is data, never formatted over.
            let mut req = create_req("w", 64 * MIB, EXT4, ext4());
            req.volume_capabilities
                .push(block_cap(Mode::SingleNodeWriter));
            let w = c.create_as(req).await.volume_id;
            let w_staging = d.path("staging-w");
            let mut c = arm(&mut d, point).await;
            let r = c.stage(&w, &w_staging, ext4()).await;
            let mut c = recover(&mut d, r, point).await;
            let raw = d.path("raw-w");
            let block = block_cap(Mode::SingleNodeWriter);
            c.publish(&w, &d.path("never-staged"), &raw, block, false)
                .await
                .unwrap();
            {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
                f.write_all_at(&[0x5a; 1 << 20], 8 << 20).unwrap();
                f.sync_all().unwrap();
            }
            c.unpublish(&w, &raw).await.unwrap();
            assert_code(
                c.stage(&w, &w_staging, ext4()).await,
                tonic::Code::FailedPrecondition,
            );
            let img = d.root.join("volumes").join(format!("{w}.img"));
            let mut back = vec![0u8; 1 << 20];
            std::os::unix::fs::FileExt::read_exact_at(
                &std::fs::File::open(img).unwrap(),
                &mut back,
                8 << 20,
            )
            .unwrap();
            assert!(back.iter().all(|b| *b == 0x5a), "the pod's data is intact");
            c.unstage(&w, &w_staging).await.unwrap();
        }
        "publish.after_target" => {
            let v = c.create("v", 64 * MIB, EXT4, ext4()).await;
            c.stage(&v.volume_id, &staging, ext4()).await.unwrap();
            let mut c = arm(&mut d, point).await;
            let r = c
                .publish(&v.volume_id, &staging, &target, ext4(), false)
                .await;
            let mut c = recover(&mut d, r, point).await;
            c.publish(&v.volume_id, &staging, &target, ext4(), false)
                .await
                .unwrap();
            assert!(is_mounted(&target));
        }
        "unstage.after_unmount" => {
            let v = c.create("v", 64 * MIB, EXT4, ext4()).await;
            c.stage(&v.volume_id, &staging, ext4()).await.unwrap();
            let mut c = arm(&mut d, point).await;
            let r = c.unstage(&v.volume_id, &staging).await;
            let mut c = recover(&mut d, r, point).await;
            c.unstage(&v.volume_id, &staging).await.unwrap();
        }
        "expand.after_grow" | "node_expand.after_refresh" => {
            let v = c.create("v", 320 * MIB, XFS, xfs()).await;
            c.stage(&v.volume_id, &staging, xfs()).await.unwrap();
            c.publish(&v.volume_id, &staging, &target, xfs(), false)
                .await
                .unwrap();
            let mut c = arm(&mut d, point).await;
            let r = if point == "expand.after_grow" {
                ok(c.expand(&v.volume_id, 400 * MIB, None).await)
            } else {
                ok(c.node_expand(&v.volume_id, &target, 400 * MIB, None).await)
            };
            let mut c = recover(&mut d, r, point).await;
            let e = c.expand(&v.volume_id, 400 * MIB, None).await.unwrap();
            assert_eq!(e.capacity_bytes, 400 * MIB);
            let n = c
                .node_expand(&v.volume_id, &target, 400 * MIB, None)
                .await
                .unwrap();
            assert_eq!(n.capacity_bytes, 400 * MIB);
            let s = nix::sys::statvfs::statvfs(&target).unwrap();
            assert!(s.blocks() as u64 * s.fragment_size() as u64 > 320 << 20);
        }
        "record.replaced" => {
            // ControllerUnpublish replaces the volume's record; the crash leaves the
            // new copy (detached) durable and the old one (attached) not yet
            // cleared. The next write is the delete: if start-up did not clear the
            // old copy, it would come back once the new one is gone.
            let v = c.create("v", 64 * MIB, &[], rwo()).await;
            c.controller
                .controller_publish_volume(ControllerPublishVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    node_id: NODE.into(),
                    volume_capability: Some(rwo()),
                    ..Default::default()
                })
                .await
                .unwrap();
            let unpublish = ControllerUnpublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                node_id: NODE.into(),
                ..Default::default()
            };
            let mut c = arm(&mut d, point).await;
            let r = ok(c
                .controller
                .controller_unpublish_volume(unpublish.clone())
                .await);
            let mut c = recover(&mut d, r, point).await;
            // The new copy won: the retry has nothing to do, and the delete may go.
            c.controller
                .controller_unpublish_volume(unpublish)
                .await
                .unwrap();
            c.delete(&v.volume_id).await.unwrap();
            d.restart_after_kill9().await;
            let mut c = d.clients().await;
            let left = c.all_volumes().await;
            assert!(left.is_empty(), "a removed record came back: {left:?}");
        }
        other => panic!("no scenario for crash point {other}"),
    }
    let mut c = d.clients().await;
    teardown_and_check(&d, &mut c, point).await;
    eprintln!("crash point {point}: recovered, nothing orphaned");
}

#[tokio::test]
async fn every_crash_point_recovers_without_orphans() {
    if !need_root() {
        return;
    }
    for point in localvol::faults::POINTS {
        walk(point).await;
    }
    eprintln!("{} crash points walked", localvol::faults::POINTS.len());
}
