//! Live reconfiguration through QMP: disks, NICs, vCPUs and memory added to (or removed from) a
//! running QEMU. Each add is all-or-nothing: a failed step undoes the steps before it, so a
//! failure leaves QEMU as it was.

use crate::cmdline::{disk_node, nic_node, port_id, user_net_options};
use crate::qmp::{Qmp, QmpError};
use drover_model::{DiskConfig, NicBackend, NicConfig, Plugged, PluggedCpu, PluggedDimm, Proto};
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

/// What QEMU holds hot-plugged (vCPUs and DIMMs), for a QEMU that must continue this one (a
/// restore, a migration's destination): see [`drover_model::Plugged`].
pub async fn plugged(qmp: &Qmp) -> Result<Plugged, QmpError> {
    let cpus = qmp.execute("query-cpus-fast", None).await?;
    let slots = qmp.execute("query-hotpluggable-cpus", None).await?;
    let memory = qmp.execute("query-memory-devices", None).await?;
    plugged_from(&cpus, &slots, &memory).map_err(QmpError::Protocol)
}

/// Device ids under this QOM path are the ones given with `device_add`/`-device`.
const PERIPHERAL: &str = "/machine/peripheral/";

/// [`plugged`] from QEMU's answers to `query-cpus-fast`, `query-hotpluggable-cpus` and
/// `query-memory-devices`. A QEMU numbers vCPUs in the order it makes them and a state names
/// them by that number, so the boot vCPUs must be the first ones and the plugged ones follow
/// without gaps: a layout a new QEMU cannot make again (a boot vCPU unplugged, or one unplugged
/// and plugged again) is an error, said in words an operator can act on.
pub fn plugged_from(cpus: &Value, slots: &Value, memory: &Value) -> Result<Plugged, String> {
    let list = |v: &Value, what: &str| -> Result<Vec<Value>, String> {
        v.as_array()
            .cloned()
            .ok_or_else(|| format!("{what} returned {v}"))
    };
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
    let mut cpus = list(cpus, "query-cpus-fast")?;
    cpus.sort_by_key(|c| n(c, "cpu-index").unwrap_or(u64::MAX));
    let driver = list(slots, "query-hotpluggable-cpus")?
        .iter()
        .find_map(|s| s.get("type").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default();
    let mut out = Plugged::default();
    for (i, c) in cpus.iter().enumerate() {
        if n(c, "cpu-index") != Some(i as u64) {
            return Err(
                "its vCPUs were unplugged and plugged again (QEMU numbers them with a gap); \
                 restart the VM before saving or moving its running state"
                    .into(),
            );
        }
        let path = c
            .get("qom-path")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some(id) = path.strip_prefix(PERIPHERAL) else {
            if !out.cpus.is_empty() {
                return Err(
                    "a boot vCPU follows a plugged one; restart the VM before saving \
                            or moving its running state"
                        .into(),
                );
            }
            continue;
        };
        let props = c.get("props").cloned().unwrap_or(Value::Null);
        let p = |k: &str| n(&props, k).unwrap_or(0) as u32;
        out.cpus.push(PluggedCpu {
            id: id.to_string(),
            driver: driver.clone(),
            socket: p("socket-id"),
            core: p("core-id"),
            thread: p("thread-id"),
        });
    }
    if driver.is_empty() && !out.cpus.is_empty() {
        return Err("QEMU named no vCPU type".into());
    }
    for m in list(memory, "query-memory-devices")? {
        let data = m.get("data").cloned().unwrap_or(Value::Null);
        let kind = m.get("type").and_then(Value::as_str).unwrap_or_default();
        let id = data.get("id").and_then(Value::as_str).unwrap_or_default();
        let Some(id) = id.strip_prefix("dimm-").filter(|_| kind == "dimm") else {
            return Err(format!(
                "it holds a memory device Drover did not plug ({kind} {id:?})"
            ));
        };
        let (bytes, addr, slot) = (n(&data, "size"), n(&data, "addr"), n(&data, "slot"));
        let (Some(bytes), Some(addr), Some(slot)) = (bytes, addr, slot) else {
            return Err(format!("QEMU did not say where DIMM {id} is: {data}"));
        };
        out.dimms.push(PluggedDimm {
            id: id.to_string(),
            bytes,
            addr,
            slot: slot as u32,
        });
    }
    out.dimms.sort_by_key(|d| d.slot);
    Ok(out)
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

    fn cpu(index: u64, path: &str, socket: u64) -> Value {
        json!({"cpu-index": index, "qom-path": path, "target": "x86_64", "thread-id": 100 + index,
               "props": {"socket-id": socket, "core-id": 0, "thread-id": 0}})
    }

    fn slots() -> Value {
        json!([{"type": "Westmere-x86_64-cpu", "vcpus-count": 1, "props": {"socket-id": 2}}])
    }

    #[test]
    fn plugged_vcpus_and_dimms_are_read_in_the_order_qemu_made_them() {
        let cpus = json!([
            cpu(2, "/machine/peripheral/vcpu-s2-c0-t0", 2),
            cpu(0, "/machine/unattached/device[0]", 0),
            cpu(1, "/machine/peripheral/vcpu-s1-c0-t0", 1),
        ]);
        let mem = json!([
            {"type": "dimm", "data": {"id": "dimm-m9", "memdev": "/objects/mem-m9", "size": 268435456,
             "addr": 4563402752u64, "slot": 1, "node": 0, "hotplugged": true, "hotpluggable": true}},
            {"type": "dimm", "data": {"id": "dimm-m5", "memdev": "/objects/mem-m5", "size": 134217728,
             "addr": 4429185024u64, "slot": 0, "node": 0, "hotplugged": true, "hotpluggable": true}},
        ]);
        let p = plugged_from(&cpus, &slots(), &mem).unwrap();
        let ids: Vec<_> = p.cpus.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["vcpu-s1-c0-t0", "vcpu-s2-c0-t0"]);
        assert_eq!(p.cpus[1].socket, 2);
        assert_eq!(p.cpus[0].driver, "Westmere-x86_64-cpu");
        let dimms: Vec<_> = p.dimms.iter().map(|d| (d.id.as_str(), d.slot)).collect();
        assert_eq!(dimms, [("m5", 0), ("m9", 1)]);
        assert_eq!(p.dimm_bytes(), 384 << 20);
        assert_eq!(p.dimms[0].addr, 4429185024);
    }

    #[test]
    fn a_vm_never_grown_has_nothing_plugged() {
        let cpus = json!([cpu(0, "/machine/unattached/device[0]", 0)]);
        let p = plugged_from(&cpus, &slots(), &json!([])).unwrap();
        assert!(p.is_empty());
    }

    #[test]
    fn layouts_a_new_qemu_cannot_make_again_are_refused() {
        // A vCPU unplugged and plugged again: QEMU numbered it past a gap.
        let gap = json!([
            cpu(0, "/machine/unattached/device[0]", 0),
            cpu(2, "/machine/peripheral/vcpu-s1-c0-t0", 1),
        ]);
        assert!(plugged_from(&gap, &slots(), &json!([]))
            .unwrap_err()
            .contains("restart the VM"));
        // A boot vCPU after a plugged one.
        let order = json!([
            cpu(0, "/machine/unattached/device[0]", 0),
            cpu(1, "/machine/peripheral/vcpu-s1-c0-t0", 1),
            cpu(2, "/machine/unattached/device[1]", 2),
        ]);
        assert!(plugged_from(&order, &slots(), &json!([])).is_err());
        // Memory Drover did not plug, or a DIMM without its address.
        let cpus = json!([cpu(0, "/machine/unattached/device[0]", 0)]);
        let nvdimm =
            json!([{"type": "nvdimm", "data": {"id": "n0", "size": 1, "addr": 1, "slot": 0}}]);
        assert!(plugged_from(&cpus, &slots(), &nvdimm).is_err());
        let no_addr = json!([{"type": "dimm", "data": {"id": "dimm-m1", "size": 1, "slot": 0}}]);
        assert!(plugged_from(&cpus, &slots(), &no_addr).is_err());
        assert!(plugged_from(&json!({}), &slots(), &json!([])).is_err());
    }
}
