//! The CSI spec's MUST rules, RPC by RPC, against the real binary: required fields,
//! idempotency, NOT_FOUND and ALREADY_EXISTS cases, pagination, capability checks.

mod common;

use common::*;
use localvol::proto::volume_capability::access_mode::Mode;
use localvol::proto::*;
use tonic::Code;

#[tokio::test]
async fn identity() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let info = c
        .identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, DRIVER);
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = c
        .identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use plugin_capability::service::Type;
    let types: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(types.contains(&(Type::ControllerService as i32)));
    assert!(types.contains(&(Type::VolumeAccessibilityConstraints as i32)));
    assert_eq!(
        c.identity
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        Some(true)
    );
}

#[tokio::test]
async fn create_volume_rules() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let ctl = &mut c.controller;

    // Required fields.
    assert_code(
        ctl.create_volume(create_req("", MIB, &[], rwo())).await,
        Code::InvalidArgument,
    );
    let mut no_caps = create_req("pvc-a", MIB, &[], rwo());
    no_caps.volume_capabilities.clear();
    assert_code(ctl.create_volume(no_caps).await, Code::InvalidArgument);
    let mut no_mode = create_req("pvc-a", MIB, &[], rwo());
    no_mode.volume_capabilities[0].access_mode = None;
    assert_code(ctl.create_volume(no_mode).await, Code::InvalidArgument);
    let mut no_type = create_req("pvc-a", MIB, &[], rwo());
    no_type.volume_capabilities[0].access_type = None;
    assert_code(ctl.create_volume(no_type).await, Code::InvalidArgument);

    // Parameters are validated and named.
    let err = ctl
        .create_volume(create_req("pvc-a", MIB, &[("tpye", "dir")], rwo()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("tpye"), "{}", err.message());
    assert_code(
        ctl.create_volume(create_req("pvc-a", MIB, &[("type", "nfs")], rwo()))
            .await,
        Code::InvalidArgument,
    );

    // Capacity ranges.
    let mut bad = create_req("pvc-a", 10 * MIB, &[], rwo());
    bad.capacity_range = Some(CapacityRange {
        required_bytes: 10 * MIB,
        limit_bytes: MIB,
    });
    assert_code(ctl.create_volume(bad).await, Code::OutOfRange);
    let mut neg = create_req("pvc-a", -1, &[], rwo());
    neg.capacity_range = Some(CapacityRange {
        required_bytes: -1,
        limit_bytes: 0,
    });
    assert_code(ctl.create_volume(neg).await, Code::InvalidArgument);

    // Multi-node modes and block access are refused on a node-local directory volume.
    assert_code(
        ctl.create_volume(create_req(
            "pvc-a",
            MIB,
            &[],
            mount_cap(Mode::MultiNodeMultiWriter),
        ))
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.create_volume(create_req(
            "pvc-a",
            MIB,
            &[],
            block_cap(Mode::SingleNodeWriter),
        ))
        .await,
        Code::InvalidArgument,
    );

    // Idempotent by name; Kubernetes' own keys are accepted.
    let kv = [
        ("csi.storage.k8s.io/pvc/name", "www-web-0"),
        ("csi.storage.k8s.io/pvc/namespace", "default"),
    ];
    let v1 = ctl
        .create_volume(create_req("pvc-a", 3 * MIB, &kv, rwo()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let v2 = ctl
        .create_volume(create_req("pvc-a", 3 * MIB, &kv, rwo()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v1, v2);
    // Same name, incompatible size or parameters: ALREADY_EXISTS.
    assert_code(
        ctl.create_volume(create_req("pvc-a", 30 * MIB, &kv, rwo()))
            .await,
        Code::AlreadyExists,
    );
    assert_code(
        ctl.create_volume(create_req("pvc-a", 3 * MIB, &[], rwo()))
            .await,
        Code::AlreadyExists,
    );

    // Topology: a requisite naming another node is refused; this node is accepted.
    let topo = |node: &str| Topology {
        segments: [(TOPOLOGY_KEY.to_string(), node.to_string())].into(),
    };
    let mut other = create_req("pvc-b", MIB, &[], rwo());
    other.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![topo("elsewhere")],
        preferred: vec![],
    });
    assert_code(ctl.create_volume(other).await, Code::ResourceExhausted);
    let mut here = create_req("pvc-b", MIB, &[], rwo());
    here.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![topo("elsewhere"), topo(NODE)],
        preferred: vec![topo(NODE)],
    });
    ctl.create_volume(here).await.unwrap();
    // The same name again, asked for another node only: it exists, incompatibly.
    let mut moved = create_req("pvc-b", MIB, &[], rwo());
    moved.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![topo("elsewhere")],
        preferred: vec![],
    });
    assert_code(ctl.create_volume(moved).await, Code::AlreadyExists);
    // Only a preferred topology elsewhere: the plugin may choose, and does (here).
    let mut preferred = create_req("pvc-p", MIB, &[], rwo());
    preferred.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![],
        preferred: vec![topo("elsewhere")],
    });
    let made = ctl.create_volume(preferred).await.unwrap().into_inner();
    assert_eq!(
        made.volume.unwrap().accessible_topology[0].segments[TOPOLOGY_KEY],
        NODE
    );

    // A retry asking for other capabilities asks for another volume.
    let loop_kv = [("type", "loop")];
    let block = block_cap(Mode::SingleNodeWriter);
    ctl.create_volume(create_req("pvc-blk", 16 * MIB, &loop_kv, block.clone()))
        .await
        .unwrap();
    ctl.create_volume(create_req("pvc-blk", 16 * MIB, &loop_kv, block))
        .await
        .unwrap();
    for other in [rwo(), block_cap(Mode::SingleNodeSingleWriter)] {
        let r = ctl
            .create_volume(create_req("pvc-blk", 16 * MIB, &loop_kv, other))
            .await;
        let s = r.unwrap_err();
        assert_eq!(s.code(), Code::AlreadyExists, "{s:?}");
        assert!(s.message().contains("capabilities"), "{}", s.message());
    }

    // A content source this version cannot restore from is refused, not ignored.
    let mut from_snap = create_req("pvc-c", MIB, &[], rwo());
    from_snap.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: "snap-00000000000000000000000000000000".into(),
            },
        )),
    });
    let code = ctl
        .create_volume(from_snap.clone())
        .await
        .unwrap_err()
        .code();
    assert!(
        matches!(code, Code::NotFound | Code::InvalidArgument),
        "{code:?}"
    );
    // Asked on a node chosen by the scheduler (a requisite topology), a source this
    // node does not hold is RESOURCE_EXHAUSTED: Kubernetes then picks another node.
    from_snap.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![topo(NODE)],
        preferred: vec![topo(NODE)],
    });
    let s = ctl.create_volume(from_snap).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("holds its source"), "{}", s.message());
}

#[tokio::test]
async fn delete_validate_get_rules() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    assert_code(c.delete("").await, Code::InvalidArgument);
    c.delete("vol-00000000000000000000000000000000")
        .await
        .unwrap(); // unknown: success
    c.delete("../../etc").await.unwrap(); // cannot be ours: success, touches nothing

    let v = c.create("pvc-v", MIB, &[], rwo()).await;
    let ctl = &mut c.controller;
    let validate = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    assert_code(
        ctl.validate_volume_capabilities(validate("", vec![rwo()]))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.validate_volume_capabilities(validate(&v.volume_id, vec![]))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.validate_volume_capabilities(validate("vol-0123", vec![rwo()]))
            .await,
        Code::NotFound,
    );
    let ok = ctl
        .validate_volume_capabilities(validate(&v.volume_id, vec![rwo()]))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let no = ctl
        .validate_volume_capabilities(validate(
            &v.volume_id,
            vec![mount_cap(Mode::MultiNodeMultiWriter)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());
    // Parameters, context and mutable parameters are confirmed only when they are
    // the volume's.
    let with = |parameters: &[(&str, &str)], context: &[(&str, &str)], mutable: &[(&str, &str)]| {
        ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_capabilities: vec![rwo()],
            parameters: params(parameters),
            volume_context: params(context),
            mutable_parameters: params(mutable),
            ..Default::default()
        }
    };
    for (req, confirmed) in [
        (with(&[], &[("type", "dir")], &[]), true),
        (
            with(&[], &[("type", "dir"), ("csi.storage.k8s.io/x", "y")], &[]),
            true,
        ),
        (with(&[("type", "loop")], &[], &[]), false),
        (with(&[("tpye", "x")], &[], &[]), false),
        (with(&[], &[("type", "loop")], &[]), false),
        (with(&[], &[], &[("iops", "5")]), false),
    ] {
        let what = format!(
            "{:?} {:?} {:?}",
            req.parameters, req.volume_context, req.mutable_parameters
        );
        let r = ctl
            .validate_volume_capabilities(req)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.confirmed.is_some(), confirmed, "{what}: {}", r.message);
        assert_eq!(r.message.is_empty(), confirmed, "{what}");
    }
    // A loop volume made for block access is not confirmed for a filesystem.
    let blk = c
        .create(
            "pvc-vb",
            16 * MIB,
            &[("type", "loop")],
            block_cap(Mode::SingleNodeWriter),
        )
        .await;
    let ctl = &mut c.controller;
    let r = ctl
        .validate_volume_capabilities(validate(&blk.volume_id, vec![rwo()]))
        .await
        .unwrap()
        .into_inner();
    assert!(r.confirmed.is_none(), "{r:?}");
    assert!(r.message.contains("block"), "{}", r.message);

    let get = |id: &str| ControllerGetVolumeRequest {
        volume_id: id.into(),
    };
    assert_code(
        ctl.controller_get_volume(get("")).await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.controller_get_volume(get("vol-00000000000000000000000000000000"))
            .await,
        Code::NotFound,
    );
    let got = ctl
        .controller_get_volume(get(&v.volume_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap(), v);
    assert!(!got.status.unwrap().volume_condition.unwrap().abnormal);

    // Data removed behind the driver's back: the condition says so.
    std::fs::remove_dir_all(d.root.join("volumes").join(&v.volume_id)).unwrap();
    let got = ctl
        .controller_get_volume(get(&v.volume_id))
        .await
        .unwrap()
        .into_inner();
    let cond = got.status.unwrap().volume_condition.unwrap();
    assert!(cond.abnormal, "{cond:?}");
}

#[tokio::test]
async fn list_volumes_paginates() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let mut want = vec![];
    for i in 0..7 {
        want.push(
            c.create(&format!("pvc-list-{i}"), MIB, &[], rwo())
                .await
                .volume_id,
        );
    }
    want.sort();
    let mut got = vec![];
    let mut token = String::new();
    loop {
        let page = c
            .controller
            .list_volumes(ListVolumesRequest {
                max_entries: 3,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 3);
        got.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(got, want);
    // A token for a volume deleted in between still continues.
    c.delete(&want[2]).await.unwrap();
    let page = c
        .controller
        .list_volumes(ListVolumesRequest {
            max_entries: 2,
            starting_token: want[2].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.entries[0].volume.as_ref().unwrap().volume_id, want[3]);
    assert_code(
        c.controller
            .list_volumes(ListVolumesRequest {
                max_entries: 1,
                starting_token: "garbage".into(),
            })
            .await,
        Code::Aborted,
    );
    assert_code(
        c.controller
            .list_volumes(ListVolumesRequest {
                max_entries: -1,
                starting_token: String::new(),
            })
            .await,
        Code::InvalidArgument,
    );
}

#[tokio::test]
async fn capacity_and_node_info() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let cap = |topo: Option<&str>| GetCapacityRequest {
        volume_capabilities: vec![rwo()],
        parameters: Default::default(),
        accessible_topology: topo.map(|n| Topology {
            segments: [(TOPOLOGY_KEY.to_string(), n.to_string())].into(),
        }),
    };
    let here = c
        .controller
        .get_capacity(cap(Some(NODE)))
        .await
        .unwrap()
        .into_inner();
    assert!(here.available_capacity > 0);
    assert_eq!(here.maximum_volume_size, Some(here.available_capacity));
    let none = c
        .controller
        .get_capacity(cap(None))
        .await
        .unwrap()
        .into_inner();
    assert!(none.available_capacity > 0);
    let elsewhere = c
        .controller
        .get_capacity(cap(Some("other")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(elsewhere.available_capacity, 0);
    assert_eq!(elsewhere.maximum_volume_size, Some(0));
    let mut bad = cap(None);
    bad.parameters = params(&[("bogus", "1")]);
    assert_code(c.controller.get_capacity(bad).await, Code::InvalidArgument);
    // A class CreateVolume refuses on this node (no --shared-root) has no room here.
    let mut shared = cap(None);
    shared.parameters = params(&[("shared", "true")]);
    let r = c
        .controller
        .get_capacity(shared)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.available_capacity, 0);

    let info = c
        .node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE);
    assert_eq!(
        info.accessible_topology.unwrap().segments[TOPOLOGY_KEY],
        NODE
    );
    let caps = c
        .node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!caps.capabilities.is_empty());
    let caps = c
        .controller
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!caps.capabilities.is_empty());
}

#[tokio::test]
async fn node_rules() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let v = c.create("pvc-node", MIB, &[], rwo()).await;
    let id = v.volume_id.as_str();
    let staging = d.path("staging");
    let target = d.path("target");
    std::fs::create_dir_all(&staging).unwrap();

    // Required fields.
    assert_code(c.stage("", &staging, rwo()).await, Code::InvalidArgument);
    assert_code(
        c.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.into(),
                volume_capability: Some(rwo()),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        c.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        c.stage(id, std::path::Path::new("relative/path"), rwo())
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        c.publish("", &staging, &target, rwo(), false).await,
        Code::InvalidArgument,
    );
    assert_code(
        c.unpublish(id, std::path::Path::new("")).await,
        Code::InvalidArgument,
    );
    assert_code(c.unstage("", &staging).await, Code::InvalidArgument);

    // Unknown volumes.
    let ghost = "vol-00000000000000000000000000000000";
    assert_code(c.stage(ghost, &staging, rwo()).await, Code::NotFound);
    assert_code(
        c.publish(ghost, &staging, &target, rwo(), false).await,
        Code::NotFound,
    );
    assert_code(c.unpublish(ghost, &target).await, Code::NotFound);
    assert_code(c.unstage(ghost, &staging).await, Code::NotFound);

    // Publish before stage is a precondition failure.
    assert_code(
        c.publish(id, &staging, &target, rwo(), false).await,
        Code::FailedPrecondition,
    );
    // Unpublish / unstage of something not mounted: OK.
    c.unpublish(id, &target).await.unwrap();
    c.unstage(id, &staging).await.unwrap();

    // Stats: required fields, unknown path.
    let stats = |vid: &str, p: &str| NodeGetVolumeStatsRequest {
        volume_id: vid.into(),
        volume_path: p.into(),
        staging_target_path: String::new(),
    };
    assert_code(
        c.node.node_get_volume_stats(stats("", "/tmp")).await,
        Code::InvalidArgument,
    );
    assert_code(
        c.node.node_get_volume_stats(stats(id, "")).await,
        Code::InvalidArgument,
    );
    assert_code(
        c.node
            .node_get_volume_stats(stats(id, "/nonexistent/path/x"))
            .await,
        Code::NotFound,
    );
    assert_code(
        c.node.node_get_volume_stats(stats(ghost, "/tmp")).await,
        Code::NotFound,
    );
    // The volume is looked up before the path is judged (as csi-sanity checks):
    // an unknown one is NOT_FOUND at any path, and no volume is "on" a relative
    // path.
    assert_code(
        c.node
            .node_get_volume_stats(stats(ghost, "some/path"))
            .await,
        Code::NotFound,
    );
    assert_code(
        c.node.node_get_volume_stats(stats(id, "some/path")).await,
        Code::NotFound,
    );
    assert_code(
        c.node_expand(ghost, std::path::Path::new("some/path"), MIB, None)
            .await,
        Code::NotFound,
    );
    assert_code(
        c.node_expand(id, std::path::Path::new("some/path"), MIB, None)
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        c.node_expand(id, std::path::Path::new(""), MIB, None).await,
        Code::InvalidArgument,
    );
}

/// A volume larger than the whole root filesystem is refused, not promised.
#[tokio::test]
async fn capacity_beyond_the_root_is_out_of_range() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let r = c
        .controller
        .create_volume(create_req("huge", i64::MAX / 2, &[], rwo()))
        .await;
    assert_code(r, tonic::Code::OutOfRange);

    // Nor is growing one past it: the controller's and the node's expansion alike,
    // and the capacity stays what it was.
    let v = c.create("small", MIB, &[], rwo()).await;
    for required in [i64::MAX, i64::MAX / 2] {
        assert_code(
            c.expand(&v.volume_id, required, None).await,
            tonic::Code::OutOfRange,
        );
    }
    let staging = d.path("s");
    c.stage(&v.volume_id, &staging, rwo()).await.unwrap();
    assert_code(
        c.node_expand(&v.volume_id, &staging, i64::MAX, None).await,
        tonic::Code::OutOfRange,
    );
    c.unstage(&v.volume_id, &staging).await.unwrap();
    let listed = c.all_volumes().await;
    let now = listed.iter().find(|x| x.volume_id == v.volume_id).unwrap();
    assert_eq!(now.capacity_bytes, MIB);
}

/// Node calls free only what is the volume's, answer the same request the same
/// way twice, and name a missing staging path as the spec does.
#[tokio::test]
async fn node_calls_touch_only_their_volume() {
    if !need_root() {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let dir = c.create("pvc-d", MIB, &[], rwo()).await.volume_id;
    let lp = c
        .create("pvc-l", 16 * MIB, &[("type", "loop")], rwo())
        .await
        .volume_id;
    let (staging, target) = (d.path("staging"), d.path("target"));

    // No staging path: FAILED_PRECONDITION (STAGE_UNSTAGE_VOLUME is offered).
    let mut req = NodePublishVolumeRequest {
        volume_id: dir.clone(),
        target_path: target.display().to_string(),
        volume_capability: Some(rwo()),
        ..Default::default()
    };
    let r = c.node.node_publish_volume(req.clone()).await;
    assert_code(r, Code::FailedPrecondition);

    // A mount flag "ro" makes a read-only publish; the same request again is OK.
    c.stage(&dir, &staging, rwo()).await.unwrap();
    req.staging_target_path = staging.display().to_string();
    req.volume_capability = Some(mount_cap_fs(Mode::SingleNodeWriter, "", &["ro"]));
    c.node.node_publish_volume(req.clone()).await.unwrap();
    c.node.node_publish_volume(req.clone()).await.unwrap();
    assert!(std::fs::write(target.join("f"), b"x").is_err(), "read-only");
    c.unpublish(&dir, &target).await.unwrap();
    // Staged read-write already: a read-only stage of it is another request.
    assert_code(
        c.stage(&dir, &staging, mount_cap(Mode::SingleNodeReaderOnly))
            .await,
        Code::AlreadyExists,
    );
    c.stage(&dir, &staging, rwo()).await.unwrap();

    // Someone else's mount at a path a request names is left alone, whether the
    // volume is staged elsewhere (dir) or attached nowhere (loop).
    let foreign = d.path("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    nix::mount::mount(
        Some("foreign-tmpfs"),
        &foreign,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    // NodeUnpublishVolume says so; NodeUnstageVolume answers OK, as the spec
    // asks where the volume is not staged.
    for id in [&dir, &lp] {
        let s = c.unpublish(id, &foreign).await.unwrap_err();
        assert_eq!(s.code(), Code::FailedPrecondition, "{id}: {s:?}");
        assert!(s.message().contains("foreign-tmpfs"), "{}", s.message());
        c.unstage(id, &foreign).await.unwrap();
        assert!(is_mounted(&foreign), "{id}: the foreign mount stays");
    }
    assert!(is_mounted(&staging), "the directory volume is still staged");
    nix::mount::umount2(&foreign, nix::mount::MntFlags::empty()).unwrap();
    // What a reboot leaves (a target this driver made, nothing mounted) is
    // removed, as the spec says; a path it did not make is left as it is, empty
    // or not (an unpublish must not be a way to delete a host's empty directory).
    let rebooted = d.path("rebooted");
    c.publish(&dir, &staging, &rebooted, rwo(), false)
        .await
        .unwrap();
    nix::mount::umount2(&rebooted, nix::mount::MntFlags::empty()).unwrap();
    c.unpublish(&dir, &rebooted).await.unwrap();
    assert!(!rebooted.exists());
    c.unpublish(&dir, &foreign).await.unwrap();
    assert!(foreign.is_dir(), "an empty directory it did not make stays");
    std::fs::write(foreign.join("kept"), b"x").unwrap();
    c.unpublish(&dir, &foreign).await.unwrap();
    assert!(foreign.join("kept").exists());
    let empty_file = d.path("empty-file");
    std::fs::write(&empty_file, b"").unwrap();
    c.unpublish(&dir, &empty_file).await.unwrap();
    assert!(empty_file.exists(), "an empty file it did not make stays");

    // A loop volume staged at one path is not staged at a second one too: two
    // mounts of one filesystem's device would be two writers.
    let (s1, s2) = (d.path("s1"), d.path("s2"));
    c.stage(&lp, &s1, rwo()).await.unwrap();
    let s = c.stage(&lp, &s2, rwo()).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("s1"), "{}", s.message());
    c.stage(&lp, &s1, rwo()).await.unwrap();
    c.unstage(&lp, &s1).await.unwrap();
    c.unstage(&dir, &staging).await.unwrap();
    for id in [&dir, &lp] {
        c.delete(id).await.unwrap();
    }
}

/// Kubelets before Kubernetes 1.26, `csc` and csi-sanity before v5 send the
/// socket's path as the HTTP/2 `:authority`, which h2 refuses as malformed (every
/// call reset with PROTOCOL_ERROR). Such a client, byte for byte as grpc-go writes
/// it (the authority added to the HPACK table, then named by index), is served.
#[tokio::test]
async fn a_client_naming_the_socket_as_its_authority_is_served() {
    use std::io::{Read, Write};
    let d = Driver::start().await;
    let socket = d.socket.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
            let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
            f.extend([kind, flags]);
            f.extend(stream.to_be_bytes());
            f.extend(payload);
            f
        };
        // HPACK: a literal (7-bit length prefix, no Huffman); the values here are short.
        let lit = |s: &str| {
            assert!(s.len() < 127);
            let mut b = vec![s.len() as u8];
            b.extend(s.as_bytes());
            b
        };
        let request = |authority: &[u8]| {
            // :method POST, :scheme http (static table), then the authority as given.
            let mut block = vec![0x83, 0x86];
            block.extend(authority);
            for (name, value) in [
                (":path", "/csi.v1.Identity/GetPluginInfo"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ] {
                block.push(0); // literal without indexing, new name
                block.extend(lit(name));
                block.extend(lit(value));
            }
            block
        };
        // The path, added to the table (literal with incremental indexing, name
        // :authority from the static table): the only entry, index 62.
        let mut by_literal = vec![0x41];
        by_literal.extend(lit(&socket.display().to_string()));
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        out.extend(frame(0x1, 0x4, 1, &request(&by_literal)));
        out.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
        out.extend(frame(0x1, 0x4, 3, &request(&[0x80 | 62])));
        out.extend(frame(0x0, 0x1, 3, &[0, 0, 0, 0, 0]));
        conn.write_all(&out).unwrap();

        // Each stream must bring a DATA frame naming the driver, never a reset.
        let mut answered = std::collections::BTreeSet::new();
        while answered.len() < 2 {
            let mut head = [0u8; 9];
            conn.read_exact(&mut head).expect("the server's frames");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let stream = u32::from_be_bytes(head[5..9].try_into().unwrap());
            let mut payload = vec![0; len];
            conn.read_exact(&mut payload).unwrap();
            match head[3] {
                0x3 => panic!("stream {stream} reset: error code {payload:?}"),
                0x7 => panic!("connection closed (GOAWAY): {payload:?}"),
                0x0 => {
                    let name = DRIVER.as_bytes();
                    assert!(payload.windows(name.len()).any(|w| w == name));
                    answered.insert(stream);
                }
                _ => {}
            }
        }
        assert_eq!(answered, [1, 3].into());
    })
    .await
    .unwrap();
}

/// The node calls' tables: a capability the volume does not support is
/// FAILED_PRECONDITION ("Exceeds capabilities"); the same volume and path asked
/// with other per-mount options is ALREADY_EXISTS; stats are answered only
/// where the volume is.
#[tokio::test]
async fn node_calls_judge_capabilities_and_paths_as_the_spec_says() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let v = c.create("caps", MIB, &[], rwo()).await;
    let id = v.volume_id.as_str();
    let (staging, target) = (d.path("staging"), d.path("target"));
    std::fs::create_dir_all(&staging).unwrap();

    // Block access and a mode for several nodes exceed a node-local directory.
    for cap in [
        block_cap(Mode::SingleNodeWriter),
        mount_cap(Mode::MultiNodeMultiWriter),
    ] {
        assert_code(
            c.stage(id, &staging, cap.clone()).await,
            Code::FailedPrecondition,
        );
    }
    c.stage(id, &staging, rwo()).await.unwrap();
    assert_code(
        c.publish(
            id,
            &staging,
            &target,
            mount_cap(Mode::MultiNodeReaderOnly),
            false,
        )
        .await,
        Code::FailedPrecondition,
    );

    // Staged without options; asked again with noexec: not what is there.
    let noexec = mount_cap_fs(Mode::SingleNodeWriter, "", &["noexec"]);
    assert_code(
        c.stage(id, &staging, noexec.clone()).await,
        Code::AlreadyExists,
    );
    c.publish(id, &staging, &target, noexec.clone(), false)
        .await
        .unwrap();
    c.publish(id, &staging, &target, noexec, false)
        .await
        .unwrap();
    assert_code(
        c.publish(
            id,
            &staging,
            &target,
            mount_cap_fs(Mode::SingleNodeWriter, "", &["exec"]),
            false,
        )
        .await,
        Code::AlreadyExists,
    );

    // Stats where the volume is: OK; at a directory where it is not: NOT_FOUND,
    // not the usage of whatever filesystem holds that directory.
    let stats = |p: &std::path::Path| NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: p.display().to_string(),
        staging_target_path: String::new(),
    };
    for p in [&staging, &target] {
        let s = c
            .node
            .node_get_volume_stats(stats(p))
            .await
            .unwrap()
            .into_inner();
        assert!(!s.volume_condition.unwrap().abnormal);
    }
    let elsewhere = d.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    assert_code(
        c.node.node_get_volume_stats(stats(&elsewhere)).await,
        Code::NotFound,
    );

    // Unstage at a path where it is not staged: OK, and the stage stays.
    c.unstage(id, &elsewhere).await.unwrap();
    assert!(is_mounted(&staging));
    c.unpublish(id, &target).await.unwrap();
    c.unstage(id, &staging).await.unwrap();
}

/// The capacity a volume has now, as ControllerGetVolume reports it.
async fn capacity_of(c: &mut Clients, id: &str) -> i64 {
    c.controller
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .capacity_bytes
}

/// ControllerExpandVolume judges its (optional) capability as
/// ValidateVolumeCapabilities does: one the volume does not support is
/// INVALID_ARGUMENT ("Exceeds capabilities") and grows nothing. Whether the node
/// must grow a filesystem comes from the volume, not from the request.
#[tokio::test]
async fn controller_expand_refuses_capabilities_the_volume_does_not_support() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let dir = c.create("exp-dir", MIB, &[], rwo()).await.volume_id;
    let fs = c
        .create(
            "exp-fs",
            16 * MIB,
            &[("type", "loop"), ("fsType", "ext4")],
            mount_cap_fs(Mode::SingleNodeWriter, "ext4", &[]),
        )
        .await
        .volume_id;
    let blk = c
        .create(
            "exp-blk",
            16 * MIB,
            &[("type", "loop")],
            block_cap(Mode::SingleNodeWriter),
        )
        .await
        .volume_id;
    let both = c
        .create_as(CreateVolumeRequest {
            volume_capabilities: vec![block_cap(Mode::SingleNodeWriter), rwo()],
            ..create_req("exp-both", 16 * MIB, &[("type", "loop")], rwo())
        })
        .await
        .volume_id;

    let refused = [
        (&dir, block_cap(Mode::SingleNodeWriter), "block access"),
        (&dir, mount_cap(Mode::MultiNodeMultiWriter), "several nodes"),
        (&fs, block_cap(Mode::SingleNodeWriter), "filesystem access"),
        (&fs, mount_cap(Mode::MultiNodeMultiWriter), "several nodes"),
        (
            &fs,
            mount_cap_fs(Mode::SingleNodeWriter, "xfs", &[]),
            "ext4",
        ),
        (&blk, rwo(), "block access"),
    ];
    for (id, cap, says) in refused {
        let before = capacity_of(&mut c, id).await;
        let s = c.expand(id, 32 * MIB, Some(cap.clone())).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{id} {cap:?}: {s:?}");
        assert!(s.message().contains(says), "{id}: {}", s.message());
        assert_eq!(capacity_of(&mut c, id).await, before, "{id} grew");
    }

    // Supported, or no capability at all: grown; the node step is the volume's.
    for (id, cap, node) in [
        (&dir, Some(rwo()), false),
        (&dir, None, false),
        (
            &fs,
            Some(mount_cap_fs(Mode::SingleNodeWriter, "ext4", &[])),
            true,
        ),
        (&fs, None, true),
        (&blk, Some(block_cap(Mode::SingleNodeWriter)), false),
        (&blk, None, false),
        (&both, Some(block_cap(Mode::SingleNodeWriter)), true),
        (&both, None, true),
    ] {
        let bigger = capacity_of(&mut c, id).await + MIB;
        let r = c.expand(id, bigger, cap.clone()).await.unwrap();
        assert_eq!(r.capacity_bytes, bigger, "{id} {cap:?}");
        assert_eq!(r.node_expansion_required, node, "{id} {cap:?}");
    }
    for id in [dir, fs, blk, both] {
        c.delete(&id).await.unwrap();
    }
}

async fn publish_to(
    c: &mut Clients,
    id: &str,
    cap: VolumeCapability,
    readonly: bool,
) -> Result<(), tonic::Status> {
    c.controller
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.into(),
            node_id: NODE.into(),
            volume_capability: Some(cap),
            readonly,
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// A ControllerPublishVolume to the node the volume is already published to: the
/// same request is OK, any other (read-only flag, mode, block or filesystem, a
/// capability the volume cannot serve at all) is ALREADY_EXISTS, the spec's
/// "Volume published but is incompatible". Unpublished, the same requests are
/// judged as a new attachment.
#[tokio::test]
async fn controller_publish_incompatible_with_the_attachment_is_already_exists() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let dir = c.create("pub-dir", MIB, &[], rwo()).await.volume_id;
    let fs = c
        .create("pub-fs", 16 * MIB, &[("type", "loop")], rwo())
        .await
        .volume_id;
    // Not attached yet: a capability the volume cannot serve is judged as before.
    assert_code(
        publish_to(&mut c, &dir, block_cap(Mode::SingleNodeWriter), false).await,
        Code::InvalidArgument,
    );
    assert_code(
        publish_to(&mut c, &fs, block_cap(Mode::SingleNodeWriter), false).await,
        Code::FailedPrecondition,
    );
    for id in [&dir, &fs] {
        publish_to(&mut c, id, rwo(), false).await.unwrap();
        publish_to(&mut c, id, rwo(), false).await.unwrap(); // identical: OK
        for (cap, ro) in [
            (rwo(), true),
            (mount_cap(Mode::SingleNodeSingleWriter), false),
            (block_cap(Mode::SingleNodeWriter), false),
            (mount_cap(Mode::MultiNodeMultiWriter), false),
        ] {
            let s = publish_to(&mut c, id, cap.clone(), ro).await.unwrap_err();
            assert_eq!(s.code(), Code::AlreadyExists, "{id} {cap:?} ro={ro}: {s:?}");
            assert!(
                s.message().contains("already published") && s.message().contains("read-write"),
                "says what is attached: {}",
                s.message()
            );
        }
        publish_to(&mut c, id, rwo(), false).await.unwrap();
    }
    // A read-only mode publishes read-only whatever the flag says: the same
    // request again is the same attachment.
    let ro = c
        .create("pub-ro", MIB, &[], mount_cap(Mode::SingleNodeReaderOnly))
        .await
        .volume_id;
    for _ in 0..2 {
        publish_to(&mut c, &ro, mount_cap(Mode::SingleNodeReaderOnly), false)
            .await
            .unwrap();
    }
    for id in [dir, fs, ro] {
        c.controller
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: NODE.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        c.delete(&id).await.unwrap();
    }
}

/// With --node-expansion-only the controller does not offer EXPAND_VOLUME, and
/// a ControllerExpandVolume is UNIMPLEMENTED, growing nothing.
#[tokio::test]
async fn controller_expand_is_unimplemented_with_node_expansion_only() {
    let d = Driver::start_with(vec!["--node-expansion-only".into()], None).await;
    let mut c = d.clients().await;
    for (name, kv) in [("dir", &[][..]), ("loop", &[("type", "loop")][..])] {
        let id = c.create(name, 16 * MIB, kv, rwo()).await.volume_id;
        let s = c.expand(&id, 32 * MIB, Some(rwo())).await.unwrap_err();
        assert_eq!(s.code(), Code::Unimplemented, "{name}: {s:?}");
        assert!(
            s.message().contains("--node-expansion-only"),
            "{}",
            s.message()
        );
        assert_code(c.expand(&id, 32 * MIB, None).await, Code::Unimplemented);
        assert_eq!(capacity_of(&mut c, &id).await, 16 * MIB);
        c.delete(&id).await.unwrap();
    }
}

/// The kernel's name of the filesystem holding `path`, asked of findmnt (not of
/// the driver's own code).
fn filesystem_of(path: &std::path::Path) -> String {
    let out = std::process::Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE", "-T"])
        .arg(path)
        .output()
        .expect("findmnt");
    assert!(out.status.success(), "findmnt {}", path.display());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A directory volume holds whatever filesystem its root is: a mount capability
/// may name that filesystem or none, and CreateVolume refuses (and
/// ValidateVolumeCapabilities does not confirm) any other. A shared volume holds
/// the shared root's.
#[tokio::test]
async fn directory_volumes_hold_the_filesystem_of_their_root() {
    if !need_root() {
        return;
    }
    // Test drivers' roots are under /tmp; the shared root is another filesystem.
    let local_fs = filesystem_of(std::path::Path::new("/tmp"));
    let other = if local_fs == "btrfs" { "xfs" } else { "btrfs" };
    let img = ImageFs::new(other, 512 << 20, &["-q"], "").expect("mount shared root");
    assert_eq!(filesystem_of(&img.mnt), other);
    let d = Driver::start_with(
        vec!["--shared-root".into(), img.mnt.display().to_string()],
        None,
    )
    .await;
    assert_eq!(filesystem_of(&d.root), local_fs);
    let mut c = d.clients().await;
    let fs_cap = |fs: &str| mount_cap_fs(Mode::SingleNodeWriter, fs, &[]);

    let s = c
        .controller
        .create_volume(create_req("dir-ntfs", MIB, &[], fs_cap("ntfs")))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().contains(&local_fs) && s.message().contains("type: loop"),
        "names the root's filesystem and the way to another: {}",
        s.message()
    );
    assert_code(
        c.controller
            .create_volume(create_req("dir-other", MIB, &[], fs_cap(other)))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        c.controller
            .create_volume(create_req(
                "shared-local",
                MIB,
                &[("shared", "true")],
                fs_cap(&local_fs),
            ))
            .await,
        Code::InvalidArgument,
    );
    let plain = c.create("dir-plain", MIB, &[], fs_cap("")).await.volume_id;
    let named = c
        .create("dir-named", MIB, &[], fs_cap(&local_fs))
        .await
        .volume_id;
    let shared = c
        .create("shared-named", MIB, &[("shared", "true")], fs_cap(other))
        .await
        .volume_id;

    let validate = |id: &str, fs: &str| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: vec![fs_cap(fs)],
        ..Default::default()
    };
    for (id, fs, confirmed) in [
        (&plain, "", true),
        (&plain, local_fs.as_str(), true),
        (&plain, "ntfs", false),
        (&plain, other, false),
        (&named, local_fs.as_str(), true),
        (&named, "", true),
        (&shared, other, true),
        (&shared, "", true),
        (&shared, local_fs.as_str(), false),
    ] {
        let r = c
            .controller
            .validate_volume_capabilities(validate(id, fs))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.confirmed.is_some(),
            confirmed,
            "{id} {fs:?}: {}",
            r.message
        );
        assert_eq!(r.message.is_empty(), confirmed, "{id} {fs:?}");
    }

    // ControllerExpandVolume judges the capability alike.
    assert_code(
        c.expand(&plain, 2 * MIB, Some(fs_cap("ntfs"))).await,
        Code::InvalidArgument,
    );
    c.expand(&plain, 2 * MIB, Some(fs_cap(&local_fs)))
        .await
        .unwrap();

    // GetCapacity has no room for a class CreateVolume refuses.
    let capacity = |fs: &str| GetCapacityRequest {
        volume_capabilities: vec![fs_cap(fs)],
        ..Default::default()
    };
    for (fs, room) in [("", true), (local_fs.as_str(), true), ("ntfs", false)] {
        let r = c
            .controller
            .get_capacity(capacity(fs))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.available_capacity > 0, room, "{fs:?}");
        // As Kubernetes asks: the class's parameters as they are, no capabilities.
        let as_kubernetes = GetCapacityRequest {
            parameters: [("csi.storage.k8s.io/fstype".to_string(), fs.to_string())].into(),
            ..Default::default()
        };
        let r = c
            .controller
            .get_capacity(as_kubernetes)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.available_capacity > 0, room, "{fs:?} in the parameters");
    }

    // A bind mount takes no filesystem options (a class's mountOptions arrive
    // in the capability): refused at CreateVolume, not at the stage.
    let with_options = mount_cap_fs(Mode::SingleNodeWriter, "", &["noexec", "size=10m"]);
    let s = c
        .controller
        .create_volume(create_req("dir-options", MIB, &[], with_options.clone()))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("size=10m"), "{}", s.message());
    let r = c
        .controller
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: plain.clone(),
            volume_capabilities: vec![with_options.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.confirmed.is_none() && !r.message.is_empty(), "{r:?}");
    let per_mount = mount_cap_fs(Mode::SingleNodeWriter, "", &["noexec", "nosuid", "ro"]);
    let fine = c
        .create("dir-per-mount", MIB, &[], per_mount)
        .await
        .volume_id;
    for id in [plain, named, shared, fine] {
        c.delete(&id).await.unwrap();
    }
}
