//! The Kubernetes manifests in deploy/: every kustomize tree renders with the real
//! `kubectl kustomize`, every built-in object passes `kubernetes-validate --strict`
//! against the API schemas, the snapshot CRD objects are checked here for their
//! required fields, and the trees agree with each other and with the driver (names,
//! StorageClass parameters, socket paths, probes). Also checks that
//! tests/e2e/kind.sh parses and skips cleanly where it cannot run.
//!
//! kubectl and kubernetes-validate are required: a missing tool fails the test with
//! what to install, because a skipped check would let broken manifests through.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;
use serde_yaml_ng::Value;

/// The Kubernetes version whose schemas the objects are validated against.
const K8S_VERSION: &str = "1.32.0";
/// StorageClass parameter keys the driver accepts (besides the provisioner's
/// `csi.storage.k8s.io/*`); anything else would be INVALID_ARGUMENT at CreateVolume.
const PARAMETER_KEYS: &[&str] = &["type", "fsType", "allocation", "enforceSize", "shared"];
const SNAPSHOT_GROUP: &str = "snapshot.storage.k8s.io/";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Renders one kustomize tree (a directory relative to the repository root).
fn render(dir: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .args(["kustomize", dir])
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| {
            panic!("kubectl is needed to render {dir} ({e}); install kubectl (1.32 or later)")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("kustomize output is UTF-8");
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| {
            Value::deserialize(d)
                .unwrap_or_else(|e| panic!("{dir}: a rendered document is not YAML: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect();
    assert!(!docs.is_empty(), "{dir} rendered no object");
    docs
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(v, path).and_then(Value::as_str)
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn kind(v: &Value) -> &str {
    s(v, &["kind"]).unwrap_or("<no kind>")
}

fn name(v: &Value) -> String {
    format!(
        "{}/{}",
        kind(v),
        s(v, &["metadata", "name"]).unwrap_or("<no name>")
    )
}

fn of_kind<'a>(docs: &'a [Value], k: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| kind(d) == k).collect()
}

fn is_snapshot_crd(v: &Value) -> bool {
    s(v, &["apiVersion"]).is_some_and(|a| a.starts_with(SNAPSHOT_GROUP))
}

/// The kubernetes-validate command: its CLI, else the Python module.
fn validator() -> Vec<String> {
    let works = |cmd: &[&str]| {
        Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for cmd in [
        &["kubernetes-validate"][..],
        &["python3", "-m", "kubernetes_validate"][..],
    ] {
        if works(cmd) {
            return cmd.iter().map(|s| s.to_string()).collect();
        }
    }
    panic!(
        "kubernetes-validate is needed to check the manifests against the Kubernetes \
         schemas: `pip install kubernetes-validate` (.ci/run does)"
    );
}

/// Validates every built-in object strictly; each must be reported as passed.
fn validate_builtin(tree: &str, docs: &[Value]) {
    let builtin: Vec<&Value> = docs.iter().filter(|d| !is_snapshot_crd(d)).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("objects.yaml");
    let text: Vec<String> = builtin
        .iter()
        .map(|d| serde_yaml_ng::to_string(d).unwrap())
        .collect();
    std::fs::write(&file, text.join("---\n")).unwrap();

    let cmd = validator();
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .args(["--strict", "-k", K8S_VERSION])
        .arg(&file)
        .output()
        .expect("run kubernetes-validate");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let passed = report
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert!(
        out.status.success() && passed == builtin.len(),
        "{tree}: {passed} of {} objects passed kubernetes-validate --strict:\n{report}",
        builtin.len()
    );
    assert!(
        !report.contains("WARN") && !report.contains("ERROR"),
        "{tree}: kubernetes-validate warned:\n{report}"
    );
}

/// Required fields and allowed keys of the snapshot CRD objects (schemas of
/// external-snapshotter v8, snapshot.storage.k8s.io/v1), which kubernetes-validate
/// does not know.
fn check_snapshot_crds(tree: &str, docs: &[Value]) {
    let keys = |v: &Value| -> BTreeSet<String> {
        v.as_mapping()
            .map(|m| {
                m.keys()
                    .filter_map(|k| k.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let only = |v: &Value, allowed: &[&str], what: &str| {
        for k in keys(v) {
            assert!(
                allowed.contains(&k.as_str()),
                "{tree}: {what}: unknown field {k}"
            );
        }
    };
    for d in docs.iter().filter(|d| is_snapshot_crd(d)) {
        let n = name(d);
        assert_eq!(
            s(d, &["apiVersion"]),
            Some("snapshot.storage.k8s.io/v1"),
            "{tree}: {n}"
        );
        assert!(
            s(d, &["metadata", "name"]).is_some(),
            "{tree}: {n}: metadata.name"
        );
        match kind(d) {
            "VolumeSnapshotClass" => {
                only(
                    d,
                    &[
                        "apiVersion",
                        "kind",
                        "metadata",
                        "driver",
                        "deletionPolicy",
                        "parameters",
                    ],
                    &n,
                );
                assert!(
                    s(d, &["driver"]).is_some_and(|x| !x.is_empty()),
                    "{tree}: {n}: driver is required"
                );
                assert!(
                    matches!(s(d, &["deletionPolicy"]), Some("Delete" | "Retain")),
                    "{tree}: {n}: deletionPolicy must be Delete or Retain"
                );
                if let Some(p) = get(d, &["parameters"]) {
                    let m = p
                        .as_mapping()
                        .unwrap_or_else(|| panic!("{tree}: {n}: parameters is a map"));
                    assert!(
                        m.values().all(Value::is_string),
                        "{tree}: {n}: parameters are strings"
                    );
                }
            }
            "VolumeSnapshot" => {
                only(d, &["apiVersion", "kind", "metadata", "spec"], &n);
                let spec =
                    get(d, &["spec"]).unwrap_or_else(|| panic!("{tree}: {n}: spec is required"));
                only(
                    spec,
                    &["source", "volumeSnapshotClassName"],
                    &format!("{n} spec"),
                );
                let source = get(spec, &["source"])
                    .unwrap_or_else(|| panic!("{tree}: {n}: spec.source is required"));
                only(
                    source,
                    &["persistentVolumeClaimName", "volumeSnapshotContentName"],
                    &format!("{n} source"),
                );
                assert_eq!(
                    keys(source).len(),
                    1,
                    "{tree}: {n}: spec.source needs exactly one of its two fields"
                );
                assert!(
                    source.as_mapping().unwrap().values().all(Value::is_string),
                    "{tree}: {n}: source names are strings"
                );
            }
            other => panic!("{tree}: {n}: no check for snapshot kind {other}"),
        }
    }
}

fn check_tree(tree: &str) -> Vec<Value> {
    let docs = render(tree);
    validate_builtin(tree, &docs);
    check_snapshot_crds(tree, &docs);
    docs
}

fn overlays() -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(repo().join("deploy/overlays"))
        .expect("deploy/overlays")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("kustomization.yaml").exists())
        .map(|p| {
            format!(
                "deploy/overlays/{}",
                p.file_name().unwrap().to_str().unwrap()
            )
        })
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no overlay found");
    dirs
}

#[test]
fn deploy_renders_and_validates() {
    check_tree("deploy");
}

#[test]
fn every_overlay_renders_and_validates() {
    for tree in overlays() {
        check_tree(&tree);
    }
}

#[test]
fn examples_render_and_validate() {
    check_tree("deploy/examples");
}

fn csidriver_name(docs: &[Value]) -> String {
    let drivers = of_kind(docs, "CSIDriver");
    assert_eq!(drivers.len(), 1, "one CSIDriver object");
    s(drivers[0], &["metadata", "name"]).unwrap().to_string()
}

#[test]
fn driver_objects_agree_with_the_driver() {
    for tree in std::iter::once("deploy".to_string()).chain(overlays()) {
        let docs = render(&tree);
        let driver = csidriver_name(&docs);
        assert_eq!(
            driver, "localvol.csi.io",
            "{tree}: the driver's default name"
        );
        let csi = of_kind(&docs, "CSIDriver")[0];
        let spec = get(csi, &["spec"]).unwrap();
        // README "Access modes": no attacher, the driver enforces publish itself.
        assert_eq!(
            get(spec, &["attachRequired"]).and_then(Value::as_bool),
            Some(false),
            "{tree}"
        );
        assert_eq!(
            get(spec, &["podInfoOnMount"]).and_then(Value::as_bool),
            Some(true),
            "{tree}"
        );
        assert_eq!(
            get(spec, &["storageCapacity"]).and_then(Value::as_bool),
            Some(true),
            "{tree}"
        );
        assert_eq!(s(spec, &["fsGroupPolicy"]), Some("File"), "{tree}");

        let classes = of_kind(&docs, "StorageClass");
        assert!(
            classes.len() >= 6,
            "{tree}: dir, ext4, xfs, block and Retain variants"
        );
        for sc in &classes {
            let n = name(sc);
            assert_eq!(
                s(sc, &["provisioner"]),
                Some(driver.as_str()),
                "{tree}: {n}: provisioner"
            );
            assert_eq!(
                s(sc, &["volumeBindingMode"]),
                Some("WaitForFirstConsumer"),
                "{tree}: {n}"
            );
            assert_eq!(
                get(sc, &["allowVolumeExpansion"]).and_then(Value::as_bool),
                Some(true),
                "{tree}: {n}"
            );
            if let Some(params) = get(sc, &["parameters"]).and_then(Value::as_mapping) {
                for (k, v) in params {
                    let k = k.as_str().unwrap();
                    assert!(
                        PARAMETER_KEYS.contains(&k) || k.starts_with("csi.storage.k8s.io/"),
                        "{tree}: {n}: parameter {k} is not one localvol accepts"
                    );
                    assert!(v.is_string(), "{tree}: {n}: parameter {k} must be a string");
                }
            }
        }
        let policy = |n: &str| {
            classes
                .iter()
                .find(|c| s(c, &["metadata", "name"]) == Some(n))
                .map(|c| s(c, &["reclaimPolicy"]).unwrap_or("Delete").to_string())
                .unwrap_or_else(|| panic!("{tree}: StorageClass {n} is missing"))
        };
        for (n, p) in [
            ("localvol-dir", "Delete"),
            ("localvol-dir-retain", "Retain"),
            ("localvol-ext4", "Delete"),
            ("localvol-ext4-retain", "Retain"),
            ("localvol-xfs", "Delete"),
            ("localvol-block", "Delete"),
        ] {
            assert_eq!(policy(n), p, "{tree}: {n} reclaimPolicy");
        }
        for vsc in of_kind(&docs, "VolumeSnapshotClass") {
            assert_eq!(
                s(vsc, &["driver"]),
                Some(driver.as_str()),
                "{tree}: {}",
                name(vsc)
            );
        }
        assert!(
            !of_kind(&docs, "VolumeSnapshotClass").is_empty(),
            "{tree}: a VolumeSnapshotClass"
        );
        check_daemonset(&tree, &docs, &driver);
    }
}

fn args_of(c: &Value) -> Vec<String> {
    get(c, &["args"])
        .and_then(Value::as_sequence)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn env_field(c: &Value, var: &str) -> Option<String> {
    get(c, &["env"])?
        .as_sequence()?
        .iter()
        .find(|e| s(e, &["name"]) == Some(var))
        .and_then(|e| s(e, &["valueFrom", "fieldRef", "fieldPath"]).map(String::from))
}

/// The DaemonSet wires the sidecars to the driver's socket and the kubelet's paths.
fn check_daemonset(tree: &str, docs: &[Value], driver: &str) {
    let ds = of_kind(docs, "DaemonSet");
    assert_eq!(ds.len(), 1, "{tree}: one DaemonSet");
    let pod = get(ds[0], &["spec", "template", "spec"]).unwrap();
    let containers = get(pod, &["containers"])
        .and_then(Value::as_sequence)
        .unwrap();
    let find = |n: &str| {
        containers
            .iter()
            .find(|c| s(c, &["name"]) == Some(n))
            .unwrap_or_else(|| panic!("{tree}: container {n} is missing"))
    };
    let host_path = |vol: &str| {
        get(pod, &["volumes"])
            .and_then(Value::as_sequence)
            .and_then(|v| v.iter().find(|v| s(v, &["name"]) == Some(vol)))
            .and_then(|v| s(v, &["hostPath", "path"]))
            .map(String::from)
            .unwrap_or_else(|| panic!("{tree}: hostPath volume {vol} is missing"))
    };

    let localvol = find("localvol");
    let a = args_of(localvol);
    assert_eq!(a.first().map(String::as_str), Some("serve"), "{tree}");
    for want in [
        "--endpoint=unix:///csi/csi.sock",
        "--node-id=$(NODE_NAME)",
        "--root=/var/lib/localvol",
        &format!("--driver-name={driver}"),
    ] {
        assert!(
            a.iter().any(|x| x == want),
            "{tree}: localvol lacks {want}: {a:?}"
        );
    }
    assert_eq!(
        env_field(localvol, "NODE_NAME").as_deref(),
        Some("spec.nodeName"),
        "{tree}"
    );
    assert_eq!(
        get(localvol, &["securityContext", "privileged"]).and_then(Value::as_bool),
        Some(true),
        "{tree}"
    );
    let mounts = get(localvol, &["volumeMounts"])
        .and_then(Value::as_sequence)
        .unwrap();
    let kubelet = mounts
        .iter()
        .find(|m| s(m, &["mountPath"]) == Some("/var/lib/kubelet"))
        .unwrap_or_else(|| panic!("{tree}: localvol must mount /var/lib/kubelet"));
    assert_eq!(
        s(kubelet, &["mountPropagation"]),
        Some("Bidirectional"),
        "{tree}"
    );
    assert!(
        mounts.iter().any(|m| s(m, &["mountPath"]) == Some("/dev")),
        "{tree}: /dev"
    );

    // The registrar tells the kubelet the socket's path on the host.
    let socket_dir = host_path("socket-dir");
    assert_eq!(
        socket_dir,
        format!("/var/lib/kubelet/plugins/{driver}"),
        "{tree}"
    );
    let reg = args_of(find("node-driver-registrar"));
    assert!(
        reg.contains(&format!(
            "--kubelet-registration-path={socket_dir}/csi.sock"
        )),
        "{tree}: registrar path {reg:?}"
    );
    assert_eq!(
        host_path("registration-dir"),
        "/var/lib/kubelet/plugins_registry",
        "{tree}"
    );

    let prov = find("csi-provisioner");
    let pa = args_of(prov);
    for want in [
        "--node-deployment=true",
        "--enable-capacity=true",
        "--leader-election=false",
    ] {
        assert!(
            pa.iter().any(|x| x == want),
            "{tree}: provisioner lacks {want}"
        );
    }
    assert!(
        pa.iter()
            .any(|x| x.starts_with("--capacity-ownerref-level=")),
        "{tree}"
    );
    assert_eq!(
        env_field(prov, "NODE_NAME").as_deref(),
        Some("spec.nodeName"),
        "{tree}"
    );
    assert_eq!(
        env_field(prov, "POD_NAME").as_deref(),
        Some("metadata.name"),
        "{tree}"
    );
    assert_eq!(
        env_field(prov, "NAMESPACE").as_deref(),
        Some("metadata.namespace"),
        "{tree}"
    );
    let snap = find("csi-snapshotter");
    assert!(
        args_of(snap).iter().any(|x| x == "--node-deployment=true"),
        "{tree}"
    );
    assert_eq!(
        env_field(snap, "NODE_NAME").as_deref(),
        Some("spec.nodeName"),
        "{tree}"
    );
    find("csi-resizer");

    // The liveness probe asks the livenessprobe sidecar, which asks the driver.
    let port = args_of(find("liveness-probe"))
        .into_iter()
        .find_map(|x| x.strip_prefix("--health-port=").map(String::from))
        .unwrap_or_else(|| panic!("{tree}: livenessprobe --health-port"));
    let probe = get(localvol, &["livenessProbe", "httpGet"])
        .unwrap_or_else(|| panic!("{tree}: livenessProbe"));
    assert_eq!(s(probe, &["path"]), Some("/healthz"), "{tree}");
    let probe_port = s(probe, &["port"]).unwrap();
    let declared = get(localvol, &["ports"])
        .and_then(Value::as_sequence)
        .and_then(|p| p.iter().find(|p| s(p, &["name"]) == Some(probe_port)))
        .and_then(|p| get(p, &["containerPort"]))
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{tree}: probe port {probe_port} is not declared"));
    assert_eq!(
        declared.to_string(),
        port,
        "{tree}: probe port and livenessprobe port"
    );

    // Pinned sidecars: an explicit version tag on every image but our own.
    for c in containers {
        let image = s(c, &["image"]).unwrap();
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            !tag.is_empty() && tag != "latest",
            "{tree}: image {image} is not pinned"
        );
        if s(c, &["name"]) != Some("localvol") {
            assert!(
                tag.starts_with('v'),
                "{tree}: sidecar {image} needs a release tag"
            );
        }
    }
}

#[test]
fn examples_use_classes_that_exist() {
    let examples = render("deploy/examples");
    // kind.sh installs the kind overlay with the examples: it must hold every class.
    let installed = render("deploy/overlays/kind");
    let names = |k: &str| -> BTreeSet<String> {
        of_kind(&installed, k)
            .iter()
            .filter_map(|d| s(d, &["metadata", "name"]).map(String::from))
            .collect()
    };
    let classes = names("StorageClass");
    let snapclasses = names("VolumeSnapshotClass");
    let mut used = Vec::new();
    for d in &examples {
        match kind(d) {
            "PersistentVolumeClaim" => used.push((name(d), s(d, &["spec", "storageClassName"]))),
            "StatefulSet" => {
                for t in get(d, &["spec", "volumeClaimTemplates"])
                    .and_then(Value::as_sequence)
                    .unwrap()
                {
                    used.push((name(d), s(t, &["spec", "storageClassName"])));
                }
            }
            "VolumeSnapshot" => {
                let c =
                    s(d, &["spec", "volumeSnapshotClassName"]).expect("explicit snapshot class");
                assert!(
                    snapclasses.contains(c),
                    "{}: VolumeSnapshotClass {c} does not exist",
                    name(d)
                );
            }
            _ => {}
        }
    }
    assert!(used.len() >= 6, "examples use StorageClasses: {used:?}");
    for (who, class) in used {
        let class = class.unwrap_or_else(|| panic!("{who}: storageClassName must be explicit"));
        assert!(
            classes.contains(class),
            "{who}: StorageClass {class} does not exist"
        );
    }
    // The StatefulSet of the story: web, headless Service, template www.
    let sts = of_kind(&examples, "StatefulSet");
    let web = sts
        .iter()
        .find(|d| s(d, &["metadata", "name"]) == Some("web"))
        .expect("StatefulSet web");
    assert_eq!(s(web, &["spec", "serviceName"]), Some("web"));
    let svc = of_kind(&examples, "Service");
    assert!(
        svc.iter()
            .any(|d| s(d, &["metadata", "name"]) == Some("web")
                && s(d, &["spec", "clusterIP"]) == Some("None")),
        "headless Service web"
    );
}

fn kind_script() -> PathBuf {
    repo().join("tests/e2e/kind.sh")
}

#[test]
fn kind_script_parses() {
    let out = Command::new("bash")
        .arg("-n")
        .arg(kind_script())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs kind.sh and expects exactly one line, `skipped: <why>`, and exit 0.
fn expect_skip(path_env: &str) {
    let bash = ["/bin/bash", "/usr/bin/bash"]
        .into_iter()
        .find(|b| std::path::Path::new(b).exists())
        .expect("bash");
    let out = Command::new(bash)
        .arg(kind_script())
        .env("PATH", path_env)
        .current_dir(repo())
        .output()
        .expect("run kind.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kind.sh failed: {stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().chain(stderr.lines()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {lines:?}");
    assert!(lines[0].starts_with("skipped: "), "{lines:?}");
}

#[test]
fn kind_script_skips_without_tools() {
    let empty = tempfile::tempdir().unwrap();
    expect_skip(empty.path().to_str().unwrap());
}

#[test]
fn kind_script_skips_where_it_cannot_run() {
    let path = std::env::var("PATH").unwrap_or_default();
    let runs = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let can_run = runs("docker", "info") && runs("kind", "version") && runs("kubectl", "version");
    if can_run {
        // It would really create a cluster here; that run is for people (README).
        eprintln!("docker is running: not starting a kind cluster from cargo test");
        return;
    }
    expect_skip(&path);
}
