//! Every CSI access mode against the rules localvol promises, through two real
//! drivers playing two nodes that share a root, with real mounts and real writes.
//! A SIGKILL and restart in the middle of each row must not reset any rule.

mod common;

use common::*;
use localvol::proto::volume_capability::access_mode::Mode;
use localvol::proto::*;
use std::fs;
use std::path::Path;
use tonic::Code;

const MODES: [Mode; 7] = [
    Mode::SingleNodeWriter,
    Mode::SingleNodeReaderOnly,
    Mode::MultiNodeReaderOnly,
    Mode::MultiNodeSingleWriter,
    Mode::MultiNodeMultiWriter,
    Mode::SingleNodeSingleWriter,
    Mode::SingleNodeMultiWriter,
];

fn is_multi_node(m: Mode) -> bool {
    matches!(
        m,
        Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter
    )
}

fn is_reader(m: Mode) -> bool {
    matches!(m, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
}

/// Tries to write a file in `dir`: Ok, or the errno.
fn try_write(dir: &Path, name: &str) -> Result<(), i32> {
    fs::write(dir.join(name), name.as_bytes()).map_err(|e| e.raw_os_error().unwrap_or(-1))
}

async fn controller_publish(
    c: &mut Clients,
    id: &str,
    node: &str,
    mode: Mode,
    ro: bool,
) -> Result<(), tonic::Status> {
    c.controller
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.into(),
            node_id: node.into(),
            volume_capability: Some(mount_cap(mode)),
            readonly: ro,
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn controller_unpublish(c: &mut Clients, id: &str, node: &str) {
    c.controller
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: id.into(),
            node_id: node.into(),
            secrets: Default::default(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn node_local_volumes_refuse_multi_node_modes() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let rwo = c
        .create("pvc-local", MIB, &[], mount_cap(Mode::SingleNodeWriter))
        .await;
    for mode in MODES {
        let created = c
            .controller
            .create_volume(create_req(
                &format!("pvc-local-{}", mode as i32),
                MIB,
                &[],
                mount_cap(mode),
            ))
            .await;
        let validated = c
            .controller
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: rwo.volume_id.clone(),
                volume_capabilities: vec![mount_cap(mode)],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if is_multi_node(mode) {
            let err = created.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{mode:?}");
            assert!(
                err.message().contains("several nodes"),
                "the message says why: {}",
                err.message()
            );
            assert!(
                validated.confirmed.is_none() && validated.message.contains("several nodes"),
                "{mode:?}"
            );
        } else {
            created.unwrap();
            assert!(validated.confirmed.is_some(), "{mode:?}");
        }
    }
    // A node-local volume cannot be published to another node at all.
    assert_code(
        controller_publish(
            &mut c,
            &rwo.volume_id,
            "node-b",
            Mode::SingleNodeWriter,
            false,
        )
        .await,
        Code::NotFound,
    );
    controller_publish(&mut c, &rwo.volume_id, NODE, Mode::SingleNodeWriter, false)
        .await
        .unwrap();
    controller_publish(&mut c, &rwo.volume_id, NODE, Mode::SingleNodeWriter, false)
        .await
        .unwrap();
    assert_code(
        controller_publish(&mut c, &rwo.volume_id, NODE, Mode::SingleNodeWriter, true).await,
        Code::AlreadyExists,
    );
    // Another access mode is another request too (the spec's "incompatible with
    // the specified volume_capability").
    assert_code(
        controller_publish(
            &mut c,
            &rwo.volume_id,
            NODE,
            Mode::SingleNodeSingleWriter,
            false,
        )
        .await,
        Code::AlreadyExists,
    );
    // Published on its node, a second node is told it is published elsewhere.
    assert_code(
        controller_publish(
            &mut c,
            &rwo.volume_id,
            "node-b",
            Mode::SingleNodeWriter,
            false,
        )
        .await,
        Code::FailedPrecondition,
    );
    // Published volumes are listed with their node, and cannot be deleted.
    let got = c
        .controller
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: rwo.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.status.unwrap().published_node_ids,
        vec![NODE.to_string()]
    );
    assert_code(c.delete(&rwo.volume_id).await, Code::FailedPrecondition);
    controller_unpublish(&mut c, &rwo.volume_id, NODE).await;
    controller_unpublish(&mut c, &rwo.volume_id, NODE).await;
    controller_unpublish(&mut c, "vol-00000000000000000000000000000000", NODE).await;
    c.delete(&rwo.volume_id).await.unwrap();
}

/// Two nodes' drivers, this node's and node-b's, on one shared root (a directory
/// in node A's temporary directory), and that directory.
async fn two_nodes_on_a_shared_root() -> (Driver, Driver, std::path::PathBuf) {
    let mut a = Driver::start_with(vec![], None).await;
    let shared = a.path("shared");
    fs::create_dir_all(&shared).unwrap();
    let args: Vec<String> = vec!["--shared-root".into(), shared.display().to_string()];
    a.extra_args = args.clone();
    a.restart_after_kill9().await;
    let b = Driver::start_as("node-b", args, None).await;
    (a, b, shared)
}

/// A shared volume is reachable from every node that uses the shared root, and
/// from no other: ControllerPublish to a node no driver has served the shared
/// root from is NOT_FOUND, as the spec says for a node that does not exist.
#[tokio::test]
async fn a_shared_volume_is_published_only_to_nodes_that_use_the_shared_root() {
    let (a, _b, shared) = two_nodes_on_a_shared_root().await;
    let mut ca = a.clients().await;
    let mode = Mode::MultiNodeMultiWriter;
    let vol = ca
        .create(
            "pvc-shared-nodes",
            MIB,
            &[("shared", "true")],
            mount_cap(mode),
        )
        .await;
    let id = vol.volume_id;
    assert_code(
        controller_publish(&mut ca, &id, "node-nowhere", mode, false).await,
        Code::NotFound,
    );
    controller_publish(&mut ca, &id, "node-b", mode, false)
        .await
        .unwrap();
    controller_publish(&mut ca, &id, NODE, mode, false)
        .await
        .unwrap();
    // Each node's entry names it.
    let mut named: Vec<String> = fs::read_dir(shared.join("state/nodes"))
        .unwrap()
        .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    named.sort();
    let mut want = vec![NODE.to_string(), "node-b".to_string()];
    want.sort();
    assert_eq!(named, want);
    for node in ["node-b", NODE, "node-nowhere"] {
        ca.controller
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: node.into(),
                secrets: Default::default(),
            })
            .await
            .unwrap();
    }
    ca.delete(&id).await.unwrap();
}

#[tokio::test]
async fn every_mode_on_a_shared_root_with_two_nodes_and_a_restart() {
    let (mut a, b, shared) = two_nodes_on_a_shared_root().await;
    // A third node that has served the shared root, its driver down now.
    let layout = localvol::backend::Layout {
        root: a.root.clone(),
        shared_root: Some(shared),
    };
    fs::write(layout.node_entry("node-c").unwrap(), "node-c").unwrap();
    let mut ca = a.clients().await;
    let mut cb = b.clients().await;

    for mode in MODES {
        let row = format!("{mode:?}");
        let name = format!("pvc-shared-{}", mode as i32);
        let vol = ca
            .create(&name, MIB, &[("shared", "true")], mount_cap(mode))
            .await;
        let id = vol.volume_id.clone();
        assert!(
            vol.accessible_topology.is_empty(),
            "{row}: a shared volume has no node topology"
        );

        // The attach step: node A, then node B.
        controller_publish(&mut ca, &id, NODE, mode, false)
            .await
            .unwrap();
        let second_node = controller_publish(&mut ca, &id, "node-b", mode, false).await;
        if mode == Mode::MultiNodeSingleWriter {
            // One writer among the nodes: a second one only reads.
            assert_code(second_node, Code::FailedPrecondition);
            controller_publish(&mut ca, &id, "node-b", mode, true)
                .await
                .unwrap();
        } else if is_multi_node(mode) {
            second_node.unwrap_or_else(|s| panic!("{row}: {s:?}"));
        } else {
            assert_code(second_node, Code::FailedPrecondition);
        }

        // Node A: stage, first target, write attempt.
        let staging = a.path(&format!("k/{name}/staging"));
        fs::create_dir_all(&staging).unwrap();
        ca.stage(&id, &staging, mount_cap(mode)).await.unwrap();
        let t1 = a.path(&format!("k/{name}/t1"));
        ca.publish(&id, &staging, &t1, mount_cap(mode), false)
            .await
            .unwrap();
        let write = try_write(&t1, "from-a");
        if is_reader(mode) {
            assert_eq!(write, Err(libc::EROFS), "{row}: readers cannot write");
        } else {
            assert_eq!(write, Ok(()), "{row}");
        }

        // The readonly flag always gives a read-only mount.
        let tro = a.path(&format!("k/{name}/tro"));
        let ro = ca.publish(&id, &staging, &tro, mount_cap(mode), true).await;
        if mode == Mode::SingleNodeSingleWriter {
            assert_code(ro, Code::FailedPrecondition);
        } else {
            ro.unwrap();
            assert_eq!(try_write(&tro, "ro-flag"), Err(libc::EROFS), "{row}");
            ca.unpublish(&id, &tro).await.unwrap();
        }

        // A restart in the middle resets nothing.
        a.restart_after_kill9().await;
        ca = a.clients().await;

        // Second target on the same node.
        let t2 = a.path(&format!("k/{name}/t2"));
        let second = ca.publish(&id, &staging, &t2, mount_cap(mode), false).await;
        if mode == Mode::SingleNodeSingleWriter {
            assert_code(second, Code::FailedPrecondition);
            ca.unpublish(&id, &t1).await.unwrap();
            ca.publish(&id, &staging, &t2, mount_cap(mode), false)
                .await
                .unwrap();
        } else {
            second.unwrap_or_else(|s| panic!("{row}: {s:?}"));
            ca.unpublish(&id, &t1).await.unwrap();
        }
        assert_code_or_ok(
            controller_publish(
                &mut ca,
                &id,
                "node-c",
                mode,
                mode == Mode::MultiNodeSingleWriter,
            )
            .await,
            if is_multi_node(mode) {
                Code::Ok
            } else {
                Code::FailedPrecondition
            },
        );

        // Node B, for the modes that allow a second node: it sees node A's data.
        if is_multi_node(mode) {
            let sb = b.path(&format!("k/{name}/staging"));
            fs::create_dir_all(&sb).unwrap();
            cb.stage(&id, &sb, mount_cap(mode)).await.unwrap();
            let tb = b.path(&format!("k/{name}/tb"));
            cb.publish(&id, &sb, &tb, mount_cap(mode), false)
                .await
                .unwrap();
            if mode == Mode::MultiNodeSingleWriter {
                // Node B was attached read-only: its mounts refuse writes.
                assert_eq!(fs::read(tb.join("from-a")).unwrap(), b"from-a", "{row}");
                assert_eq!(try_write(&tb, "from-b"), Err(libc::EROFS), "{row}");
            } else if !is_reader(mode) {
                assert_eq!(fs::read(tb.join("from-a")).unwrap(), b"from-a", "{row}");
                assert_eq!(try_write(&tb, "from-b"), Ok(()), "{row}");
                assert_eq!(fs::read(t2.join("from-b")).unwrap(), b"from-b", "{row}");
            } else {
                assert_eq!(try_write(&tb, "from-b"), Err(libc::EROFS), "{row}");
            }
            cb.unpublish(&id, &tb).await.unwrap();
            cb.unstage(&id, &sb).await.unwrap();
        }

        ca.unpublish(&id, &t2).await.unwrap();
        ca.unstage(&id, &staging).await.unwrap();
        controller_unpublish(&mut ca, &id, "").await;
        ca.delete(&id).await.unwrap();
    }
}

/// `assert_code` for a result that may be OK on purpose.
fn assert_code_or_ok(r: Result<(), tonic::Status>, code: Code) -> Option<()> {
    match (r, code) {
        (Ok(()), Code::Ok) => Some(()),
        (r, code) => {
            assert_code(r, code);
            None
        }
    }
}

/// A volume the controller attached read-only to this node is staged read-only:
/// the pod cannot write it, and the stage writes nothing to it either.
#[tokio::test]
async fn a_read_only_attachment_stages_read_only() {
    if !need_root() {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let ext4 = mount_cap_fs(Mode::SingleNodeWriter, "ext4", &[]);
    let v = c
        .create("ro-att", 16 * MIB, &[("type", "loop")], ext4.clone())
        .await
        .volume_id;
    let staging = d.path("staging");
    // Formatted once by a read-write stage.
    c.stage(&v, &staging, ext4.clone()).await.unwrap();
    c.unstage(&v, &staging).await.unwrap();
    controller_publish(&mut c, &v, NODE, Mode::SingleNodeWriter, true)
        .await
        .unwrap();
    c.stage(&v, &staging, ext4.clone()).await.unwrap();
    let err = std::fs::write(staging.join("f"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    c.unstage(&v, &staging).await.unwrap();
    c.controller
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: v.clone(),
            node_id: NODE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    c.delete(&v).await.unwrap();
}

/// ListVolumes on one node shows the shared volumes another node made or
/// removed since, not what the shared root held when it started.
#[tokio::test]
async fn shared_volumes_listed_as_the_shared_root_holds_them() {
    let (a, b, _) = two_nodes_on_a_shared_root().await;
    let (mut ca, mut cb) = (a.clients().await, b.clients().await);
    let ids =
        |vols: Vec<Volume>| -> Vec<String> { vols.into_iter().map(|v| v.volume_id).collect() };
    assert!(ids(cb.all_volumes().await).is_empty());
    let v = ca
        .create(
            "pvc-listed",
            MIB,
            &[("shared", "true")],
            mount_cap(Mode::MultiNodeMultiWriter),
        )
        .await;
    assert_eq!(
        ids(cb.all_volumes().await),
        vec![v.volume_id.clone()],
        "made on A, listed on B"
    );
    ca.delete(&v.volume_id).await.unwrap();
    assert!(
        ids(cb.all_volumes().await).is_empty(),
        "removed on A, gone on B"
    );
}

/// Every node's provisioner sees a shared volume's deletion: deletes on two nodes
/// at once both succeed and leave nothing; what an interrupted one left is
/// removed at the next start.
#[tokio::test]
async fn shared_volume_deleted_by_two_nodes_at_once() {
    let (a, mut b, shared) = two_nodes_on_a_shared_root().await;
    let (mut ca, mut cb) = (a.clients().await, b.clients().await);
    let vols = shared.join("volumes");
    for round in 0..5 {
        let v = ca
            .create(
                &format!("pvc-del-{round}"),
                MIB,
                &[("shared", "true")],
                mount_cap(Mode::MultiNodeMultiWriter),
            )
            .await;
        fs::write(vols.join(&v.volume_id).join("f"), vec![7u8; 64 * 1024]).unwrap();
        let (ra, rb) = tokio::join!(ca.delete(&v.volume_id), cb.delete(&v.volume_id));
        ra.unwrap();
        rb.unwrap();
        let left: Vec<_> = fs::read_dir(&vols)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "round {round}: {left:?}");
    }
    // A delete killed after its rename leaves the renamed tree: the next start
    // of a node removes it.
    let left = vols.join("vol-00000000000000000000000000000000.deleting-1");
    fs::create_dir_all(left.join("sub")).unwrap();
    fs::write(left.join("sub/f"), b"x").unwrap();
    b.restart_after_kill9().await;
    for _ in 0..200 {
        if !left.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(!left.exists(), "removed in the background after the start");
}

/// Every node's provisioner sees a shared claim, and any node may be asked to
/// attach it: creates, attachments and a delete racing an attachment on two nodes
/// at once are taken one at a time (a lock on the shared root), so one volume is
/// made, a single-node volume is attached to one node, and a deleted volume's
/// record never comes back. Each of these went wrong in most rounds before.
#[tokio::test]
async fn a_shared_volume_changed_on_two_nodes_at_once() {
    let (a, b, shared) = two_nodes_on_a_shared_root().await;
    let (mut ca, mut cb) = (a.clients().await, b.clients().await);
    let mode = Mode::SingleNodeWriter;
    let class = [("shared", "true")];
    for round in 0..10 {
        let name = format!("pvc-race-{round}");
        let (va, vb) = tokio::join!(
            ca.controller
                .create_volume(create_req(&name, MIB, &class, mount_cap(mode))),
            cb.controller
                .create_volume(create_req(&name, MIB, &class, mount_cap(mode))),
        );
        let (va, vb) = (va.unwrap().into_inner(), vb.unwrap().into_inner());
        let id = va.volume.unwrap().volume_id;
        assert_eq!(id, vb.volume.unwrap().volume_id);

        let (pa, pb) = tokio::join!(
            controller_publish(&mut ca, &id, NODE, mode, false),
            controller_publish(&mut cb, &id, "node-b", mode, false),
        );
        let won: Vec<&str> = [(NODE, &pa), ("node-b", &pb)]
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {pa:?} {pb:?}");
        for r in [&pa, &pb] {
            if let Err(e) = r {
                assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            }
        }
        controller_unpublish(&mut ca, &id, won[0]).await;

        // A delete on one node while the other attaches: one of them wins.
        let (pa, db) = tokio::join!(
            controller_publish(&mut ca, &id, NODE, mode, false),
            cb.delete(&id),
        );
        match (&pa, &db) {
            (Ok(()), Err(e)) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                controller_unpublish(&mut ca, &id, NODE).await;
                cb.delete(&id).await.unwrap();
            }
            (Err(e), Ok(())) => assert_eq!(e.code(), Code::NotFound, "{e:?}"),
            _ => panic!("round {round}: publish {pa:?}, delete {db:?}"),
        }
        assert!(
            !shared
                .join("state/volumes")
                .join(format!("{id}.json"))
                .exists(),
            "round {round}: the deleted volume's record is back"
        );
        assert!(!shared.join("volumes").join(&id).exists());
        assert!(!shared.join("state/locks").join(&id).exists());
    }
}
