//! The one log line per RPC, as JSON, from the real binary: fields present, secrets absent.

mod common;

use common::*;
use localvol::proto::*;

const SECRET: &str = "hunter2-do-not-log";

#[tokio::test]
async fn json_rpc_lines_have_method_volume_outcome_duration_and_no_secrets() {
    let d = Driver::start_with(vec!["--log-format".into(), "json".into()], None).await;
    let mut c = d.clients().await;
    let mut req = create_req("pvc-logs", MIB, &[("type", "dir")], rwo());
    req.secrets = params(&[("password", SECRET)]);
    let vol = c
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let mut bad = create_req("pvc-logs-bad", MIB, &[("type", "nope")], rwo());
    bad.secrets = params(&[("password", SECRET)]);
    assert!(c.controller.create_volume(bad).await.is_err());
    c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            secrets: params(&[("password", SECRET)]),
        })
        .await
        .unwrap();

    let log = d.log();
    assert!(!log.contains(SECRET), "a secret reached the log:\n{log}");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let rpc = |method: &str, volume: &str| {
        lines
            .iter()
            .find(|l| l["message"] == "rpc" && l["method"] == method && l["volume"] == volume)
            .unwrap_or_else(|| panic!("no rpc line for {method} {volume} in\n{log}"))
            .clone()
    };
    let ok = rpc("CreateVolume", "pvc-logs");
    assert_eq!(ok["outcome"], "OK");
    assert!(ok["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(ok["level"], "INFO");
    let bad = rpc("CreateVolume", "pvc-logs-bad");
    assert_eq!(bad["outcome"], "InvalidArgument");
    // The status message has its own key: a second "message" would make the JSON
    // ambiguous (last key wins) and hide the "rpc" marker.
    assert!(bad["error"].as_str().unwrap().contains("nope"), "{bad}");
    assert_eq!(bad["level"], "WARN");
    let del = rpc("DeleteVolume", &vol.volume_id);
    assert_eq!(del["outcome"], "OK");
    assert!(del["duration_ms"].is_number());
}
