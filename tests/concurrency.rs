//! Concurrent calls on one name or one volume, each from its own connection:
//! exactly one volume per name, no mount left behind, no published volume
//! deleted, and a deadline on the whole test so a deadlock fails it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use localvol::proto::*;
use tonic::Code;

/// Far beyond what the work takes; reaching it means something hangs.
const DEADLINE: Duration = Duration::from_secs(240);

fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let dir = std::fs::canonicalize(dir).unwrap();
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    localvol::mount::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(&dir))
        .collect()
}

#[tokio::test]
async fn same_name_created_once() {
    tokio::time::timeout(DEADLINE, async {
        let d = Driver::start().await;
        for (kind, kv) in [("dir", vec![]), ("loop", vec![("type", "loop")])] {
            if kind == "loop" && !need_root() {
                continue;
            }
            let mut tasks = vec![];
            for _ in 0..64 {
                let mut c = d.clients().await;
                let kv: Vec<(String, String)> = kv
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                tasks.push(tokio::spawn(async move {
                    let kv: Vec<(&str, &str)> =
                        kv.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    c.controller
                        .create_volume(create_req(&format!("same-{kind}"), 32 * MIB, &kv, rwo()))
                        .await
                        .map(|r| r.into_inner().volume.unwrap())
                }));
            }
            let mut answers: BTreeMap<String, usize> = BTreeMap::new();
            let mut first: Option<Volume> = None;
            for t in tasks {
                match t.await.unwrap() {
                    Ok(v) => {
                        *answers.entry("OK".into()).or_default() += 1;
                        match &first {
                            None => first = Some(v),
                            Some(f) => assert_eq!(f, &v, "two different answers"),
                        }
                    }
                    Err(s) => {
                        assert_eq!(s.code(), Code::Aborted, "{s:?}");
                        *answers.entry("ABORTED".into()).or_default() += 1;
                    }
                }
            }
            println!("64 concurrent CreateVolume ({kind}): {answers:?}");
            let v = first.expect("at least one CreateVolume succeeds");
            let mut c = d.clients().await;
            let listed: Vec<_> = c
                .all_volumes()
                .await
                .into_iter()
                .filter(|l| l.volume_id == v.volume_id)
                .collect();
            assert_eq!(listed.len(), 1);
            assert_eq!(records(&d.root, "volumes").len(), 1, "one record on disk");
            c.delete(&v.volume_id).await.unwrap();
        }
        assert!(d.clients().await.all_volumes().await.is_empty());
    })
    .await
    .expect("deadline: concurrent CreateVolume deadlocked");
}

/// Publishers race an unpublisher that also unstages and deletes. A delete only
/// succeeds once nothing is mounted, and after it nothing ever is.
async fn race_on_one_volume(d: &Driver, kind: &str, kv: &[(&str, &str)]) {
    const PUBLISHERS: usize = 8;
    const ROUNDS: usize = 6;
    let mut c = d.clients().await;
    let id = c
        .create(&format!("race-{kind}"), 64 * MIB, kv, rwo())
        .await
        .volume_id;
    let staging = d.path(&format!("staging-{kind}"));
    c.stage(&id, &staging, rwo()).await.unwrap();
    let targets: Vec<PathBuf> = (0..PUBLISHERS)
        .map(|i| d.path(&format!("target-{kind}-{i}")))
        .collect();

    // Phase 1: publish and unpublish churn while deletes try and must fail.
    let mut tasks = vec![];
    for t in targets.clone() {
        let mut c = d.clients().await;
        let (id, staging) = (id.clone(), staging.clone());
        tasks.push(tokio::spawn(async move {
            let mut outcomes = BTreeMap::<String, usize>::new();
            for _ in 0..ROUNDS {
                for r in [
                    c.publish(&id, &staging, &t, rwo(), false).await,
                    c.unpublish(&id, &t).await,
                    c.publish(&id, &staging, &t, rwo(), false).await,
                    c.delete(&id)
                        .await
                        .map(|_| panic!("deleted a staged volume")),
                ] {
                    let code = r.err().map(|s| s.code()).unwrap_or(Code::Ok);
                    assert!(
                        matches!(code, Code::Ok | Code::Aborted | Code::FailedPrecondition),
                        "{code:?}"
                    );
                    *outcomes.entry(format!("{code:?}")).or_default() += 1;
                }
            }
            outcomes
        }));
    }
    let mut total = BTreeMap::<String, usize>::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *total.entry(k).or_default() += v;
        }
    }
    println!("{kind} phase 1 (publish/unpublish/delete): {total:?}");
    assert!(is_mounted(&staging));

    // Phase 2: publishers keep going while one client unpublishes everything,
    // unstages and deletes, until its delete succeeds.
    let mut publishers = vec![];
    for t in targets.clone() {
        let mut c = d.clients().await;
        let (id, staging) = (id.clone(), staging.clone());
        publishers.push(tokio::spawn(async move {
            // Until the volume is gone (bounded, so the deleter wins in the end).
            let (mut published, mut after_delete) = (0, 0);
            for _ in 0..100 {
                match c.publish(&id, &staging, &t, rwo(), false).await {
                    Ok(()) => published += 1,
                    Err(s) if s.code() == Code::NotFound => {
                        after_delete += 1;
                        break;
                    }
                    Err(s) => assert!(
                        matches!(s.code(), Code::Aborted | Code::FailedPrecondition),
                        "{s:?}"
                    ),
                }
                tokio::task::yield_now().await;
            }
            (published, after_delete)
        }));
    }
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts < 2000, "delete never succeeded");
        for t in &targets {
            match c.unpublish(&id, t).await {
                Ok(()) => {}
                Err(s) if matches!(s.code(), Code::NotFound) => {}
                Err(s) => assert_eq!(s.code(), Code::Aborted, "{s:?}"),
            }
        }
        match c.unstage(&id, &staging).await {
            Ok(()) => {}
            Err(s) => assert!(
                matches!(s.code(), Code::FailedPrecondition | Code::Aborted),
                "{s:?}"
            ),
        }
        match c.delete(&id).await {
            Ok(()) => break,
            Err(s) => assert!(
                matches!(s.code(), Code::FailedPrecondition | Code::Aborted),
                "{s:?}"
            ),
        }
    }
    // Deleted: nothing of it is mounted or attached, now or later.
    assert_eq!(mounts_below(d.dir.path()), Vec::<PathBuf>::new());
    let (mut published, mut refused) = (0, 0);
    for p in publishers {
        let (p, r) = p.await.unwrap();
        published += p;
        refused += r;
    }
    assert_eq!(mounts_below(d.dir.path()), Vec::<PathBuf>::new());
    assert_eq!(
        loops_below(d.dir.path()).len(),
        0,
        "{kind}: a loop device stays attached"
    );
    println!("{kind} phase 2: delete succeeded after {attempts} rounds; {published} publishes raced it; {refused} publishers then got NOT_FOUND");
}

#[tokio::test]
async fn publish_unpublish_delete_race() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    tokio::time::timeout(DEADLINE, async {
        let d = Driver::start().await;
        race_on_one_volume(&d, "dir", &[]).await;
        race_on_one_volume(&d, "loop", &[("type", "loop")]).await;
        assert!(d.clients().await.all_volumes().await.is_empty());
        assert!(!d.log().contains("panicked"));
    })
    .await
    .expect("deadline: concurrent publish/unpublish/delete deadlocked");
}
