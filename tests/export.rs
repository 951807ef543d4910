//! `cairn export`: a snapshot served as an NBD disk reads byte-identical to the image it
//! was taken from, answers its zero runs as holes, refuses writes and reads out of bounds,
//! and, on a freshly recovered machine with nothing local, serves from the partners.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use cairn::mesh::{make_image, scenario, utf8, wait_at_r, wait_for, Mesh};
use cairn::nbd::{Client, Export};
use cairn::{random_bytes, write, Site};
use cairn_protocol::nbd;

const MIB: usize = 1 << 20;

/// 12 MiB: 3 MiB of data, 6 MiB of zeros, 2 MiB of data, 1 MiB of zeros.
fn image_with_holes() -> Vec<u8> {
    let mut bytes = random_bytes(3 * MIB, 1);
    bytes.resize(9 * MIB, 0);
    bytes.extend(random_bytes(2 * MIB, 2));
    bytes.resize(12 * MIB, 0);
    bytes
}

/// Reads the whole export in `step`-byte requests and returns it with the hole bytes.
fn read_all(client: &mut Client, step: u32) -> Result<(Vec<u8>, u64)> {
    let (mut all, mut holes) = (Vec::new(), 0);
    let mut offset = 0;
    while offset < client.size {
        let n = (client.size - offset).min(u64::from(step)) as u32;
        let reply = client
            .read(offset, n)?
            .map_err(|e| anyhow::anyhow!("read at {offset} failed: error {e}"))?;
        all.extend_from_slice(&reply.data);
        holes += reply.holes;
        offset += u64::from(n);
    }
    Ok((all, holes))
}

/// `qemu-img compare` of the export against the image, when qemu-img is here.
fn qemu_compare(image: &Path, uri: &str) -> Result<()> {
    let out = match Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(image)
        .arg(uri)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!(
                "qemu-img compare skipped: qemu-img not runnable here ({e}); install qemu-utils"
            );
            return Ok(());
        }
    };
    ensure!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn an_export_reads_byte_identical_answers_holes_and_refuses_writes_and_bad_reads() {
    let site = Site::new();
    let image = site.path("fs.img");
    let bytes = image_with_holes();
    write(&image, &bytes);
    site.backup("fs", &image);

    let export =
        Export::start(site.command(&["export", "fs", "--nbd", "127.0.0.1:0", "--json"])).unwrap();
    assert!(export.uri.starts_with("nbd://127.0.0.1:"), "{}", export.uri);

    // As qemu negotiates: structured replies, base:allocation, GO.
    let mut client = Client::connect(&export.uri, true).unwrap();
    assert_eq!(client.size, bytes.len() as u64);
    assert_ne!(
        client.flags & nbd::FLAG_READ_ONLY,
        0,
        "advertised read-only"
    );
    let (read, holes) = read_all(&mut client, MIB as u32).unwrap();
    assert!(read == bytes, "the export reads what was backed up");
    // The chunker makes zero extents of whole zero runs; zeros at a run's edges may ride
    // in the neighbouring data chunk, so most, not all, of the 7 MiB are holes.
    assert!(
        holes >= 4 * MIB as u64,
        "the zero runs came as holes, not bytes: {holes}"
    );
    // Unaligned reads across chunk and extent boundaries.
    for (offset, len) in [(1, 4095), (3 * MIB - 100, 300), (9 * MIB - 7, 2 * MIB + 14)] {
        let reply = client.read(offset as u64, len as u32).unwrap().unwrap();
        assert!(
            reply.data == bytes[offset..offset + len],
            "read at {offset}+{len}"
        );
    }
    let status = client.block_status(0, bytes.len() as u32).unwrap().unwrap();
    let zero = nbd::STATE_HOLE | nbd::STATE_ZERO;
    let (mut at, mut zero_bytes) = (0usize, 0);
    for &(len, flags) in &status {
        let range = &bytes[at..at + len as usize];
        if flags == zero {
            assert!(
                range.iter().all(|&b| b == 0),
                "a hole at {at}+{len} holds data"
            );
            zero_bytes += len as usize;
        } else {
            assert_eq!(flags, 0, "data or hole, nothing else");
        }
        at += len as usize;
    }
    assert_eq!(at, bytes.len(), "block status covers the image: {status:?}");
    assert!(status.len() >= 3, "a hole between data: {status:?}");
    assert_eq!(
        zero_bytes as u64, holes,
        "reads and block status agree on the holes"
    );
    assert_eq!(client.write(0, &[1; 512]).unwrap(), Err(nbd::EPERM));
    // The refused write's payload was consumed: the stream is still in step.
    assert_eq!(
        client.read(client.size - 1, 2).unwrap().unwrap_err(),
        nbd::EINVAL
    );
    let tail = client.read(client.size - 1, 1).unwrap().unwrap();
    assert_eq!(tail.data, [0]);
    client.disconnect().unwrap();

    // As an old client: EXPORT_NAME and simple replies.
    let mut old = Client::connect(&export.uri, false).unwrap();
    assert_eq!(old.size, bytes.len() as u64);
    let (read, holes) = read_all(&mut old, 3 * MIB as u32 / 2).unwrap();
    assert!(read == bytes && holes == 0);
    old.disconnect().unwrap();

    qemu_compare(&image, &export.uri).unwrap();
    let summary = export.stop().unwrap();
    assert!(summary["connections"].as_u64() >= Some(2), "{summary}");
    assert!(summary["requests"].as_u64() > Some(20), "{summary}");
}

#[test]
fn an_export_refuses_an_address_off_loopback_and_a_path_that_is_not_a_socket() {
    let site = Site::new();
    let image = site.path("fs.img");
    write(&image, &random_bytes(MIB, 3));
    site.backup("fs", &image);
    let line = site.fails(&["export", "fs", "--nbd", "0.0.0.0:10809"]);
    assert!(line.contains("only on loopback"), "{line}");
    let line = site.fails(&[
        "export",
        "fs",
        "--nbd",
        utf8(&image).map(|p| format!("unix:{p}")).unwrap().as_str(),
    ]);
    assert!(line.contains("is not a socket"), "{line}");
    let line = site.fails(&["export", "nothing", "--nbd", "127.0.0.1:0"]);
    assert!(line.contains("nothing"), "{line}");
    // The image file was left alone.
    assert_eq!(std::fs::metadata(&image).unwrap().len(), MIB as u64);
}

#[test]
fn an_export_on_a_recovered_machine_with_nothing_local_serves_from_the_partners() {
    scenario("export-from-mesh", |root, step| {
        let mut mesh = Mesh::build(root, 3, 1, step)?;
        let image = make_image(root, "fs.img", 6, 5);
        mesh.sites[0][0].ok(&["backup", "fs", utf8(&image)?])?;
        wait_at_r(&mesh.sites[0][0], "fs", 120)?;
        mesh.sites[0][0].stop();
        step("A backed up 6 MiB at R and its only node went away");

        let mut recovered = mesh.recover(0, &root.join("a-new-machine"))?;
        recovered.start(&mesh.addresses_outside(0))?;
        wait_for(
            Duration::from_secs(60),
            "the recovered node to learn A's snapshot",
            || {
                Ok(recovered
                    .ok(&["snapshots", "fs"])
                    .is_ok_and(|s| s.contains("fs")))
            },
        )?;
        let socket = root.join("fs.sock");
        let nbd = format!("unix:{}", utf8(&socket)?);
        let export = Export::start(recovered.command(&["export", "fs", "--nbd", &nbd, "--json"]))?;
        step("the recovered machine exports fs");
        let mut client = Client::connect(&export.uri, true)?;
        let (read, _) = read_all(&mut client, MIB as u32)?;
        ensure!(
            read == std::fs::read(&image)?,
            "the export from the mesh reads the image"
        );
        client.disconnect()?;
        qemu_compare(&image, &export.uri)?;
        step("read byte-identical from the partners");
        drop(export);
        Ok(())
    });
}

/// A boot sector that writes itself to the disk's second sector through the BIOS (so the
/// guest writes), then prints `CAIRN-BOOT-OK` on COM1 and exits qemu through
/// `isa-debug-exit` with status (0x10 << 1) | 1 = 33. A failed write skips the message.
fn boot_sector() -> Vec<u8> {
    let mut code = vec![
        0xfa, // cli
        0x31, 0xc0, // xor ax, ax
        0x8e, 0xd8, // mov ds, ax
        0x8e, 0xc0, // mov es, ax
        0xbb, 0x00, 0x7c, // mov bx, 0x7c00 (this sector)
        0xb8, 0x01, 0x03, // mov ax, 0x0301 (write one sector)
        0xb9, 0x02, 0x00, // mov cx, 0x0002 (cylinder 0, sector 2)
        0xba, 0x80, 0x00, // mov dx, 0x0080 (head 0, first disk)
        0xcd, 0x13, // int 0x13
        0x72, 0x0e, // jc done
        0xbe, 0x2e, 0x7c, // mov si, 0x7c00 + 46 (the message)
        0xba, 0xf8, 0x03, // mov dx, 0x3f8 (COM1)
        0xac, // next: lodsb
        0x84, 0xc0, // test al, al
        0x74, 0x03, // jz done
        0xee, // out dx, al
        0xeb, 0xf8, // jmp next
        0xba, 0xf4, 0x00, // done: mov dx, 0xf4 (isa-debug-exit)
        0xb0, 0x10, // mov al, 0x10
        0xee, // out dx, al
        0xf4, // hlt
        0xeb, 0xfd, // jmp hlt
    ];
    assert_eq!(code.len(), 46);
    code.extend_from_slice(b"CAIRN-BOOT-OK\r\n\0");
    code.resize(510, 0);
    code.extend_from_slice(&[0x55, 0xaa]);
    code
}

#[test]
fn a_vm_boots_from_the_export_and_its_writes_never_reach_the_snapshot() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "boot test skipped: qemu-system-x86_64 is missing (.ci/run installs qemu-system-x86)"
        );
        return;
    }
    let site = Site::new();
    let image = site.path("boot.img");
    let mut bytes = boot_sector();
    bytes.resize(MIB, 0);
    bytes.extend(random_bytes(MIB, 9));
    bytes.resize(4 * MIB, 0);
    write(&image, &bytes);
    site.backup("boot", &image);
    let socket = site.path("boot.sock");
    let nbd = format!("unix:{}", socket.display());
    let export = Export::start(site.command(&["export", "boot", "--nbd", &nbd, "--json"])).unwrap();

    let serial = site.path("serial.txt");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel", "tcg", "-m", "64", "-display", "none", "-monitor", "none",
        ])
        .args(["-no-reboot", "-nodefaults", "-snapshot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=ide", export.uri))
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = qemu.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = qemu.kill();
            let _ = qemu.wait();
            panic!("the VM did not finish booting in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(
        console.contains("CAIRN-BOOT-OK"),
        "serial console: {console:?}"
    );
    assert_eq!(status.code(), Some(33), "the guest's own exit, not a crash");
    eprintln!(
        "booted from the export in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // The guest wrote its boot sector to sector 2 (the message says the write succeeded);
    // the export is read-only, so it went to qemu's overlay and the snapshot reads as it
    // was backed up, zeros at sector 2.
    let mut client = Client::connect(&export.uri, true).unwrap();
    let (read, _) = read_all(&mut client, MIB as u32).unwrap();
    assert!(
        read[512..1024].iter().all(|&b| b == 0),
        "the guest's write reached the snapshot"
    );
    assert!(read == bytes, "the snapshot is unchanged");
    client.disconnect().unwrap();
    let summary = export.stop().unwrap();
    assert!(summary["chunks_opened"].as_u64() >= Some(1), "{summary}");
}

#[test]
fn a_restore_into_qcow2_vhdx_and_vmdk_is_the_image_and_checks_clean() {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        eprintln!("format test skipped: qemu-img is missing (Debian: qemu-utils)");
        return;
    }
    let site = Site::new();
    let image = site.path("fs.img");
    let bytes = image_with_holes();
    write(&image, &bytes);
    site.backup("fs", &image);
    for format in ["qcow2", "vhdx", "vmdk"] {
        let out = site.path(&format!("fs.{format}"));
        let printed = site.ok(&[
            "restore",
            "fs",
            utf8(&out).unwrap(),
            "--format",
            format,
            "--json",
        ]);
        let summary: serde_json::Value = serde_json::from_str(&printed).unwrap();
        assert_eq!(summary["format"], format);
        let compare = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", format])
            .arg(&image)
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            compare.status.success(),
            "{format}: {}",
            String::from_utf8_lossy(&compare.stdout)
        );
        let check = Command::new("qemu-img")
            .args(["check", "-f", format])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "qemu-img check {format}: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        // Sparse: the zero runs take no space (the image is 12 MiB, 5 MiB of it data).
        let on_disk = summary["file_bytes"].as_u64().unwrap();
        assert!(on_disk < 10 * MIB as u64, "{format} takes {on_disk} bytes");
        assert!(!site.path(&format!("fs.{format}.cairn-partial")).exists());
    }
    let out = site.path("fs.qcow2");
    let line = site.fails(&["restore", "fs", utf8(&out).unwrap(), "--format", "qcow2"]);
    assert!(line.contains("--force"), "{line}");
    site.ok(&[
        "restore",
        "fs",
        utf8(&out).unwrap(),
        "--format",
        "qcow2",
        "--force",
    ]);
}

#[test]
fn a_snapshot_runs_as_a_vm_its_writes_kept_in_its_overlay_and_vm_stop_ends_it() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "vm test skipped: qemu-system-x86_64 is missing (.ci/run installs qemu-system-x86)"
        );
        return;
    }
    let site = Site::new();
    let image = site.path("boot.img");
    let mut bytes = boot_sector();
    bytes.resize(2 * MIB, 0);
    write(&image, &bytes);
    site.backup("boot", &image);
    let start = || {
        Export::start(site.command(&[
            "vm", "start", "boot", "--accel", "tcg", "--memory", "64M", "--json",
        ]))
        .unwrap()
    };
    let vm = start();
    assert_eq!(vm.first["overlay_reused"], false);
    let console = vm.first["console_log"].as_str().unwrap().to_owned();
    let overlay = vm.first["overlay"].as_str().unwrap().to_owned();
    wait_for(
        Duration::from_secs(60),
        "the guest's marker on its console",
        || Ok(std::fs::read_to_string(&console).is_ok_and(|c| c.contains("CAIRN-BOOT-OK"))),
    )
    .unwrap();

    let list: serde_json::Value =
        serde_json::from_str(&site.ok(&["vm", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["image"], "boot");
    let line = site.fails(&["vm", "start", "boot", "--accel", "tcg"]);
    // Without a node the running `vm start` holds the data dir; inside one, the VM's record
    // refuses it. Either way a second VM never boots on the same overlay.
    assert!(
        line.contains("already runs") || line.contains("in use"),
        "{line}"
    );

    site.ok(&["vm", "stop", "boot"]);
    let summary = vm.finish().unwrap();
    assert!(summary["read_bytes"].as_u64() > Some(0), "{summary}");
    let list: serde_json::Value =
        serde_json::from_str(&site.ok(&["vm", "list", "--json"])).unwrap();
    assert_eq!(list, serde_json::json!([]));
    let line = site.fails(&["vm", "stop", "boot"]);
    assert!(line.contains("no VM of boot"), "{line}");

    // The guest wrote its boot sector to sector 2: that is in the overlay (read through
    // an export on the VM's socket again), and the snapshot is as backed up.
    let socket = Path::new(&overlay).with_file_name("nbd.sock");
    let nbd = format!("unix:{}", socket.display());
    let export = Export::start(site.command(&["export", "boot", "--nbd", &nbd, "--json"])).unwrap();
    let view = site.path("view.raw");
    let convert = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw", &overlay])
        .arg(&view)
        .output()
        .unwrap();
    assert!(
        convert.status.success(),
        "{}",
        String::from_utf8_lossy(&convert.stderr)
    );
    let seen = std::fs::read(&view).unwrap();
    assert!(
        seen[512..1024] == seen[..512],
        "the guest's write is in the overlay"
    );
    let mut client = Client::connect(&export.uri, true).unwrap();
    let (read, _) = read_all(&mut client, MIB as u32).unwrap();
    assert!(read == bytes, "the snapshot is unchanged");
    client.disconnect().unwrap();
    export.stop().unwrap();

    let vm = start();
    assert_eq!(vm.first["overlay_reused"], true);
    assert_eq!(vm.first["overlay"], overlay.as_str());
    site.ok(&["vm", "stop", "boot"]);
    vm.finish().unwrap();

    // A newer snapshot does not silently replace the overlay that holds the old one's writes.
    bytes[2 * MIB - 1] = 1;
    write(&image, &bytes);
    site.backup("boot", &image);
    let line = site.fails(&["vm", "start", "boot", "--accel", "tcg"]);
    assert!(line.contains("move it away"), "{line}");
}
