//! The Prometheus endpoint of the real binary, scraped over plain HTTP after real calls.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};

use common::*;
use tonic::Code;

/// A port free a moment ago; the driver binds it right after.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(port: u16, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

/// `name{labels}` -> value, comments skipped.
fn samples(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn metrics_count_calls_errors_volumes_and_space() {
    let port = free_port();
    let d = Driver::start_with(
        vec!["--metrics-address".into(), format!("127.0.0.1:{port}")],
        None,
    )
    .await;
    let mut c = d.clients().await;
    let a = c
        .create("pvc-m1", 64 * MIB, &[("type", "dir")], rwo())
        .await;
    c.create("pvc-m2", 32 * MIB, &[("type", "dir")], rwo())
        .await;
    assert_code(
        c.controller
            .create_volume(create_req("pvc-m3", MIB, &[("type", "nope")], rwo()))
            .await,
        Code::InvalidArgument,
    );
    // 1 MiB of real data in one volume.
    std::fs::write(
        d.root.join("volumes").join(&a.volume_id).join("data"),
        vec![7u8; 1 << 20],
    )
    .unwrap();

    let (head, body) = get(port, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase().contains("content-type: text/plain"),
        "{head}"
    );
    let m = samples(&body);
    let val = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in\n{body}"));
    assert_eq!(
        val(r#"localvol_rpc_requests_total{method="CreateVolume"}"#),
        3.0
    );
    assert_eq!(
        val(r#"localvol_rpc_errors_total{method="CreateVolume",code="InvalidArgument"}"#),
        1.0
    );
    assert_eq!(
        val(r#"localvol_rpc_duration_seconds_count{method="CreateVolume"}"#),
        3.0
    );
    assert_eq!(val(r#"localvol_volumes{type="dir"}"#), 2.0);
    assert_eq!(
        val(r#"localvol_volume_provisioned_bytes{type="dir"}"#),
        (96 * MIB) as f64
    );
    let used = val(r#"localvol_volume_used_bytes{type="dir"}"#);
    assert!(used >= (1 << 20) as f64, "used {used}");
    assert_eq!(val("localvol_volume_used_bytes_complete"), 1.0);
    assert!(val("localvol_root_capacity_bytes") > 0.0);
    let free = val("localvol_root_free_bytes");
    assert!(free > 0.0 && free <= val("localvol_root_capacity_bytes"));
    assert_eq!(val("localvol_loop_devices_attached"), 0.0);
    assert_eq!(val("localvol_rpc_in_flight"), 0.0);
    assert_eq!(val("localvol_trash_pending"), 0.0);

    // Counts move with calls.
    c.delete(&a.volume_id).await.unwrap();
    let m = samples(&get(port, "/metrics").1);
    assert_eq!(m[r#"localvol_volumes{type="dir"}"#], 1.0);
    assert_eq!(
        m[r#"localvol_rpc_requests_total{method="DeleteVolume"}"#],
        1.0
    );

    let (head, _) = get(port, "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}
