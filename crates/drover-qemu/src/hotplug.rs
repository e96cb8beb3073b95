//! Live reconfiguration through QMP: disks, NICs, vCPUs and memory added to (or removed from) a
//! running QEMU. Each add is all-or-nothing: a failed step undoes the steps before it, so a
//! failure leaves QEMU as it was.

use crate::cmdline::{disk_node, nic_node, port_id, user_net_options};
use crate::qmp::{Qmp, QmpError};
use drover_model::{DiskConfig, NicBackend, NicConfig, Proto};
use serde_json::{json, Value};

/// Hot-plug a disk onto root port `slot` (the disk's `slot` field is ignored here), opened as
/// `blockdev` says when given (a chain droverd names, [`crate::cmdline::chain_blockdev`]), else
/// from its path.
pub async fn add_disk(
    qmp: &Qmp,
    d: &DiskConfig,
    slot: u8,
    blockdev: Option<Value>,
) -> Result<(), QmpError> {
    let node = disk_node(d);
    let blockdev = blockdev.unwrap_or_else(|| {
        json!({
            "driver": d.format.to_string(),
            "node-name": node,
            "read-only": d.readonly,
            "discard": "unmap",
            "file": {"driver": "file", "filename": d.path, "read-only": d.readonly},
        })
    });
    qmp.execute("blockdev-add", Some(blockdev)).await?;
    let dev = json!({
        "driver": "virtio-blk-pci",
        "id": node,
        "drive": node,
        "serial": d.id.as_str(),
        "bus": port_id(slot),
    });
    if let Err(e) = qmp.execute("device_add", Some(dev)).await {
        let _ = qmp
            .execute("blockdev-del", Some(json!({"node-name": node})))
            .await;
        return Err(e);
    }
    Ok(())
}

/// Hot-plug a NIC onto root port `slot`.
pub async fn add_nic(qmp: &Qmp, n: &NicConfig, slot: u8) -> Result<(), QmpError> {
    let node = nic_node(n.id.as_str());
    let netdev = match &n.backend {
        NicBackend::User { forwards } => {
            let fwd: Vec<Value> = forwards
                .iter()
                .map(|f| {
                    let proto = match f.proto {
                        Proto::Tcp => "tcp",
                        Proto::Udp => "udp",
                    };
                    json!({"str": format!("{proto}:{}:{}-:{}", f.host_addr, f.host_port, f.guest_port)})
                })
                .collect();
            let mut v = json!({"type": "user", "id": node});
            // Its own subnet, the one it keeps on later boots (see `user_net_numbers`).
            let k = (drover_model::MAX_NICS as u8).saturating_add(slot);
            for (key, value) in user_net_options(k).into_iter().flatten() {
                v[key] = value.into();
            }
            if !fwd.is_empty() {
                v["hostfwd"] = Value::Array(fwd);
            }
            v
        }
        NicBackend::Tap { ifname } => json!({
            "type": "tap", "id": node, "ifname": ifname, "script": "no", "downscript": "no", "vhost": false,
        }),
    };
    qmp.execute("netdev_add", Some(netdev)).await?;
    let dev = json!({
        "driver": "virtio-net-pci",
        "id": node,
        "netdev": node,
        "mac": n.mac.to_string(),
        "bus": port_id(slot),
    });
    if let Err(e) = qmp.execute("device_add", Some(dev)).await {
        let _ = qmp.execute("netdev_del", Some(json!({"id": node}))).await;
        return Err(e);
    }
    Ok(())
}

/// Ask QEMU to unplug a device; the guest must acknowledge (QEMU then emits `DEVICE_DELETED`).
pub async fn request_unplug(qmp: &Qmp, device_id: &str) -> Result<(), QmpError> {
    qmp.execute("device_del", Some(json!({"id": device_id})))
        .await
        .map(|_| ())
}

/// Free a disk's (top) block node after its device is gone.
pub async fn remove_disk_backend(qmp: &Qmp, node: &str) -> Result<(), QmpError> {
    qmp.execute("blockdev-del", Some(json!({"node-name": node})))
        .await
        .map(|_| ())
}

/// Free a NIC's netdev after its device is gone.
pub async fn remove_nic_backend(qmp: &Qmp, n: &NicConfig) -> Result<(), QmpError> {
    qmp.execute("netdev_del", Some(json!({"id": nic_node(n.id.as_str())})))
        .await
        .map(|_| ())
}

/// One vCPU slot from `query-hotpluggable-cpus`.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuSlot {
    /// The CPU device type (`max-x86_64-cpu`).
    pub driver: String,
    /// Topology properties to plug it with.
    pub props: Value,
    /// Its QOM path when present (plugged).
    pub qom_path: Option<String>,
}

/// All vCPU slots, plugged or not.
pub async fn cpu_slots(qmp: &Qmp) -> Result<Vec<CpuSlot>, QmpError> {
    let v = qmp.execute("query-hotpluggable-cpus", None).await?;
    let arr = v
        .as_array()
        .ok_or_else(|| QmpError::Protocol(format!("query-hotpluggable-cpus returned {v}")))?;
    Ok(arr
        .iter()
        .map(|c| CpuSlot {
            driver: c
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            props: c.get("props").cloned().unwrap_or(Value::Null),
            qom_path: c
                .get("qom-path")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
        .collect())
}

/// The device id Drover gives the vCPU it plugs into topology slot `props`.
fn cpu_device_id(props: &Value) -> String {
    let n = |k: &str| props.get(k).and_then(Value::as_u64).unwrap_or(0);
    format!(
        "vcpu-s{}-c{}-t{}",
        n("socket-id"),
        n("core-id"),
        n("thread-id")
    )
}

/// Plug vCPUs until `target` are present. Returns how many were added.
pub async fn add_cpus(qmp: &Qmp, target: u32) -> Result<Vec<String>, QmpError> {
    let slots = cpu_slots(qmp).await?;
    let present = slots.iter().filter(|s| s.qom_path.is_some()).count() as u32;
    if target <= present {
        return Ok(Vec::new());
    }
    let mut free: Vec<&CpuSlot> = slots.iter().filter(|s| s.qom_path.is_none()).collect();
    // query-hotpluggable-cpus lists the highest ids first; plug in ascending order.
    free.reverse();
    let need = (target - present) as usize;
    if free.len() < need {
        return Err(QmpError::Command {
            command: "device_add".into(),
            class: "GenericError".into(),
            desc: format!("only {} vCPU slots are free, {need} needed", free.len()),
        });
    }
    let mut added: Vec<String> = Vec::new();
    for slot in free.into_iter().take(need) {
        let mut args = json!({"driver": slot.driver, "id": cpu_device_id(&slot.props)});
        if let (Some(obj), Some(props)) = (args.as_object_mut(), slot.props.as_object()) {
            for (k, v) in props {
                obj.insert(k.clone(), v.clone());
            }
        }
        if let Err(e) = qmp.execute("device_add", Some(args)).await {
            for id in added.iter().rev() {
                let _ = qmp.execute("device_del", Some(json!({"id": id}))).await;
            }
            return Err(e);
        }
        added.push(cpu_device_id(&slot.props));
    }
    Ok(added)
}

/// Ask the guest to release hot-plugged devices (vCPUs, DIMMs), newest first. Each goes once the
/// guest acknowledges (a `DEVICE_DELETED` event); the caller waits for those.
pub async fn request_unplug_all(qmp: &Qmp, device_ids: &[String]) -> Result<(), QmpError> {
    for id in device_ids.iter().rev() {
        request_unplug(qmp, id).await?;
    }
    Ok(())
}

/// The device and backend ids of the DIMM [`add_memory`] plugs as `id`.
pub fn dimm_ids(id: &str) -> (String, String) {
    (format!("dimm-{id}"), format!("mem-{id}"))
}

/// Drop a DIMM's memory backend once its device is gone.
pub async fn remove_memory_backend(qmp: &Qmp, id: &str) -> Result<(), QmpError> {
    let (_, mem) = dimm_ids(id);
    qmp.execute("object-del", Some(json!({"id": mem})))
        .await
        .map(|_| ())
}

/// Plug a DIMM of `bytes` backed by anonymous memory. `id` names both backend and device.
pub async fn add_memory(qmp: &Qmp, id: &str, bytes: u64) -> Result<(), QmpError> {
    let (dimm, mem) = dimm_ids(id);
    qmp.execute(
        "object-add",
        Some(json!({"qom-type": "memory-backend-ram", "id": mem, "size": bytes})),
    )
    .await?;
    let dev = json!({"driver": "pc-dimm", "id": dimm, "memdev": mem});
    if let Err(e) = qmp.execute("device_add", Some(dev)).await {
        let _ = qmp.execute("object-del", Some(json!({"id": mem}))).await;
        return Err(e);
    }
    Ok(())
}

/// Memory QEMU reports as present: base plus plugged DIMMs, in bytes.
pub async fn memory_size(qmp: &Qmp) -> Result<u64, QmpError> {
    let v = qmp.execute("query-memory-size-summary", None).await?;
    let base = v.get("base-memory").and_then(Value::as_u64).unwrap_or(0);
    let plugged = v.get("plugged-memory").and_then(Value::as_u64).unwrap_or(0);
    Ok(base + plugged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    /// A fake QEMU with one vCPU present and two free slots: answers, and records every command.
    async fn fake(path: &std::path::Path) -> tokio::task::JoinHandle<Vec<Value>> {
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"capabilities\": []}}\n").await.unwrap();
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                let v: Value = serde_json::from_str(&line).unwrap();
                let ret = match v["execute"].as_str().unwrap() {
                    "query-hotpluggable-cpus" => json!([
                        {"type": "max-x86_64-cpu", "props": {"socket-id": 2, "core-id": 0, "thread-id": 0}},
                        {"type": "max-x86_64-cpu", "props": {"socket-id": 1, "core-id": 0, "thread-id": 0}},
                        {"type": "max-x86_64-cpu", "props": {"socket-id": 0, "core-id": 0, "thread-id": 0}, "qom-path": "/machine/unattached/device[0]"},
                    ]),
                    _ => json!({}),
                };
                seen.push(v.clone());
                let id = v["id"].clone();
                w.write_all(format!("{}\n", json!({"return": ret, "id": id})).as_bytes())
                    .await
                    .unwrap();
            }
            seen
        })
    }

    /// What a failed live change needs to take vCPUs and a DIMM out again: the ids plugged,
    /// unplugged newest first, and the DIMM's backend.
    #[tokio::test]
    async fn plugged_vcpus_and_dimms_can_be_taken_out_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let server = fake(&path).await;
        let (qmp, _events) = Qmp::connect(&path).await.unwrap();
        let added = add_cpus(&qmp, 3).await.unwrap();
        assert_eq!(added, ["vcpu-s1-c0-t0", "vcpu-s2-c0-t0"]);
        add_memory(&qmp, "m1", 128 << 20).await.unwrap();
        let mut devices = added.clone();
        devices.push(dimm_ids("m1").0);
        request_unplug_all(&qmp, &devices).await.unwrap();
        remove_memory_backend(&qmp, "m1").await.unwrap();
        drop(qmp);
        let seen = server.await.unwrap();
        let dels: Vec<&str> = seen
            .iter()
            .filter(|v| v["execute"] == "device_del")
            .filter_map(|v| v["arguments"]["id"].as_str())
            .collect();
        assert_eq!(dels, ["dimm-m1", "vcpu-s2-c0-t0", "vcpu-s1-c0-t0"]);
        let last = seen.last().unwrap();
        assert_eq!(
            (last["execute"].as_str(), last["arguments"]["id"].as_str()),
            (Some("object-del"), Some("mem-m1"))
        );
    }
}
