//! A real Linux boot from `cairn export` (issue 17): Debian's kernel and initramfs mount
//! their root filesystem from the exported snapshot, its init writes a file and prints a
//! marker on the serial console; the write stays in qemu's overlay, the snapshot reads
//! as it was backed up. Then the same boot on a freshly recovered machine with nothing
//! local, from two partner sites, one of which is killed once the VM is running.

use std::time::Duration;

use anyhow::{ensure, Result};
use cairn::linux::{self, Kernel};
use cairn::mesh::{scenario, utf8, wait_at_r, wait_for, Mesh};
use cairn::nbd::{Client, Export};
use cairn::Site;

const DISK_MIB: u64 = 64;
const BOOT_LIMIT: Duration = Duration::from_secs(300);

/// The whole export, read in 1 MiB requests.
fn read_export(uri: &str) -> Result<Vec<u8>> {
    let mut client = Client::connect(uri, true)?;
    let mut all = Vec::new();
    while (all.len() as u64) < client.size {
        let n = (client.size - all.len() as u64).min(1 << 20) as u32;
        let reply = client
            .read(all.len() as u64, n)?
            .map_err(|e| anyhow::anyhow!("read at {} failed: error {e}", all.len()))?;
        all.extend_from_slice(&reply.data);
    }
    client.disconnect()?;
    Ok(all)
}

fn kernel_or_skip(what: &str) -> Option<Kernel> {
    if !linux::tools_or_skip(what, &linux::missing_tools()) {
        return None;
    }
    Kernel::find()
}

#[test]
fn linux_boots_from_the_export_to_its_init_and_its_writes_stay_in_the_overlay() {
    let Some(kernel) = kernel_or_skip("the Linux boot test") else {
        return;
    };
    let site = Site::new();
    let disk = site.path("linux.img");
    linux::make_disk(&disk, DISK_MIB).unwrap();
    let bytes = std::fs::read(&disk).unwrap();
    site.backup("linux", &disk);
    let nbd = format!("unix:{}", site.path("linux.sock").display());
    let export =
        Export::start(site.command(&["export", "linux", "--nbd", &nbd, "--json"])).unwrap();

    let serial = site.path("serial.txt");
    let booted = linux::boot(&kernel, &export.uri, &serial, BOOT_LIMIT, || Ok(())).unwrap();
    assert!(
        booted.console.contains(linux::MARKER),
        "no marker on the console:\n{}",
        booted.console
    );
    eprintln!(
        "Linux booted from the export to its init in {:.1}s ({})",
        booted.seconds, booted.status
    );

    // The guest remounted its root writable and wrote a file before the marker; the
    // export is read-only, so it all went to qemu's overlay.
    assert!(
        read_export(&export.uri).unwrap() == bytes,
        "the snapshot changed under the guest's writes"
    );
    let summary = export.stop().unwrap();
    assert!(summary["requests"].as_u64() > Some(0), "{summary}");
}

#[test]
fn a_recovered_machine_boots_linux_from_the_partners_while_one_of_them_dies() {
    let Some(kernel) = kernel_or_skip("the Linux boot from the mesh") else {
        return;
    };
    scenario("boot-from-mesh", |root, step| {
        let mut mesh = Mesh::build(root, 3, 1, step)?;
        let disk = root.join("linux.img");
        linux::make_disk(&disk, DISK_MIB)?;
        mesh.sites[0][0].ok(&["backup", "linux", utf8(&disk)?])?;
        wait_at_r(&mesh.sites[0][0], "linux", 120)?;
        mesh.sites[0][0].stop();
        step("office A backed up a bootable Linux disk to 3 sites and its node went away");

        let mut recovered = mesh.recover(0, &root.join("a-new-machine"))?;
        recovered.start(&mesh.addresses_outside(0))?;
        wait_for(
            Duration::from_secs(60),
            "the recovered node to learn A's snapshot",
            || {
                Ok(recovered
                    .ok(&["snapshots", "linux"])
                    .is_ok_and(|s| s.contains("linux")))
            },
        )?;
        let nbd = format!("unix:{}", utf8(&root.join("linux.sock"))?);
        let export =
            Export::start(recovered.command(&["export", "linux", "--nbd", &nbd, "--json"]))?;
        step("the recovered machine, with no chunk of its own, exports the snapshot");

        let serial = root.join("serial.txt");
        let holder = &mut mesh.sites[1][0];
        let booted = linux::boot(&kernel, &export.uri, &serial, BOOT_LIMIT, || {
            holder.kill();
            Ok(())
        })?;
        ensure!(
            booted.console.contains(linux::MARKER),
            "no marker on the console:\n{}",
            booted.console
        );
        step(&format!(
            "booted to init in {:.1}s from the mesh; office B was killed (SIGKILL) as the VM started",
            booted.seconds
        ));
        ensure!(
            read_export(&export.uri)? == std::fs::read(&disk)?,
            "the export from the one partner left reads the image"
        );
        let summary = export.stop()?;
        ensure!(summary["chunks_opened"].as_u64() > Some(0), "{summary}");
        step("every byte reads from office C alone, and the snapshot is unchanged");
        Ok(())
    });
}
