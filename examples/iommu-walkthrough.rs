//! iommu-walkthrough: the iommu-core object model, in one process.
//!
//! Two devices bind to one `Iommu` context; an IOAS is filled from memfd
//! memory; the devices attach, translate, read and write; one device raises
//! an I/O page fault that the "VMM" (this main thread) answers; finally an
//! unmap shows that the devices' cached translations are dropped before it
//! returns. Prints a transcript; exits 0 on success, 1 with a message on
//! the first unexpected result.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use iommu_core::{
    Error, FaultStatus, HwInfo, HwptAlloc, Iommu, IommuDevice, Memory, PageResponseCode, Perm,
    IOMMU_HWPT_ALLOC_PASID,
};

type Res<T> = Result<T, Box<dyn StdError>>;

const KIB: u64 = 1024;

fn check(cond: bool, what: &str) -> Res<()> {
    if cond {
        Ok(())
    } else {
        Err(format!("check failed: {what}").into())
    }
}

fn step(n: u32, title: &str) {
    println!("\n[{n}] {title}");
}

fn run() -> Res<()> {
    println!("ioasis iommu-walkthrough: the /dev/iommu object model in userspace");

    step(1, "open a context and bind two devices");
    let iommu = Iommu::new();
    let net = IommuDevice::new(
        "net0",
        HwInfo {
            reserved: vec![HwInfo::X86_MSI_WINDOW],
            ..HwInfo::default()
        },
    );
    let accel = IommuDevice::new("accel0", HwInfo::full());
    let net_id = iommu.bind(&net)?;
    let accel_id = iommu.bind(&accel)?;
    for id in [net_id, accel_id] {
        let info = iommu.hw_info(id)?;
        println!(
            "    dev_id {id}: pasid bits {}, min page {} B, nesting {}, iopf {}, reserved {:x?}",
            info.max_pasid_log2,
            info.min_page_size(),
            info.nesting,
            info.iopf,
            info.reserved
        );
    }
    match iommu.bind(&net) {
        Err(e) => println!("    binding net0 twice: {e} (errno {})", e.errno()),
        Ok(_) => return Err("a second bind succeeded".into()),
    }

    step(2, "allocate an IOAS and map memfd memory into it");
    let mem = Memory::anonymous("guest-ram", (1024 * KIB) as usize)?;
    println!(
        "    memfd-backed memory: {} KiB at {:p}",
        mem.len() / 1024,
        mem.as_ptr()
    );
    let ioas = iommu.ioas_alloc()?;
    let a = iommu.ioas_map(ioas, &mem, 0, 64 * KIB, Some(0x10000), Perm::RW)?;
    let b = iommu.ioas_map(ioas, &mem, 512 * KIB, 64 * KIB, Some(0x20000), Perm::RW)?;
    let c = iommu.ioas_map(ioas, &mem, 256 * KIB, 16 * KIB, None, Perm::READ)?;
    println!("    ioas {ioas}: fixed area at {a:#x}, adjacent area at {b:#x} (other host pages), auto area at {c:#x} (read-only)");

    step(3, "attach both devices");
    let net_hwpt = iommu.attach(net_id, None, ioas)?;
    println!("    net0 attached to ioas {ioas} through auto HWPT {net_hwpt}");
    let ranges = iommu.ioas_iova_ranges(ioas)?;
    println!(
        "    usable IOVA ranges now: {:x?} (alignment {:#x}): net0's MSI window is excluded",
        ranges.ranges, ranges.alignment
    );
    let (fault_id, faults) = iommu.fault_queue_alloc()?;
    let accel_hwpt = iommu.hwpt_alloc(&HwptAlloc {
        dev_id: accel_id,
        pt_id: ioas,
        flags: IOMMU_HWPT_ALLOC_PASID,
        fault_id: Some(fault_id),
        ..Default::default()
    })?;
    iommu.attach(accel_id, None, accel_hwpt)?;
    println!("    accel0 attached to fault-capable HWPT {accel_hwpt} (fault queue {fault_id})");

    step(4, "translate, write and read through the devices");
    let mut net_t = net.translator();
    let mut accel_t = accel.translator();
    net_t.write(None, 0x1fffc, b"hello, iommu")?;
    let mut buf = [0u8; 12];
    accel_t.read(None, 0x1fffc, &mut buf)?;
    println!(
        "    net0 wrote at 0x1fffc, accel0 read back {:?}",
        String::from_utf8_lossy(&buf)
    );
    check(
        &buf == b"hello, iommu",
        "data written by net0 is read by accel0",
    )?;
    let mut frags = Vec::new();
    net_t
        .access()
        .translate(None, 0x1fff0, 0x20, Perm::READ, &mut frags)?;
    println!("    [0x1fff0, +0x20) is {} host fragments:", frags.len());
    for f in &frags {
        println!("        {:p} + {:#x}", f.ptr, f.len);
    }
    check(frags.len() == 2, "a range over two areas is two fragments")?;
    match net_t.write(None, c, b"x") {
        Err(e @ Error::AccessDenied { .. }) => {
            println!("    write to the read-only area: {e} (errno {})", e.errno())
        }
        other => return Err(format!("write to a read-only area gave {other:?}").into()),
    }

    step(5, "raise an I/O page fault and answer it");
    let pending = match accel_t.read(None, 0x80010, &mut buf) {
        Err(Error::FaultRaised { pending, .. }) => pending,
        other => return Err(format!("expected a page fault, got {other:?}").into()),
    };
    println!(
        "    accel0 read at 0x80010: fault raised, cookie {}, status {:?}",
        pending.cookie(),
        pending.status()
    );
    let mut records = Vec::new();
    let n = faults.read_batch(&mut records, 16)?;
    check(n == 1, "one fault record")?;
    let r = records[0];
    println!(
        "    fault queue: dev_id {} addr {:#x} perm {:?} grpid {} cookie {}",
        r.dev_id, r.addr, r.perm, r.grpid, r.cookie
    );
    mem.write_at((768 * KIB) as usize + 0x10, b"paged in!!!!")?;
    iommu.ioas_map(ioas, &mem, 768 * KIB, 4 * KIB, Some(r.addr), Perm::RW)?;
    faults.respond(r.cookie, PageResponseCode::Success)?;
    let status = pending.wait_timeout(Duration::from_secs(5));
    println!("    handler mapped the page and answered SUCCESS; device sees {status:?}");
    check(
        status == FaultStatus::Success,
        "the device learns the answer",
    )?;
    accel_t.read(None, 0x80010, &mut buf)?;
    println!("    retry reads {:?}", String::from_utf8_lossy(&buf));

    step(
        6,
        "unmap: cached translations are dropped before it returns",
    );
    println!(
        "    cached translations before: net0 {}, accel0 {}",
        net_t.cached_translations(),
        accel_t.cached_translations()
    );
    {
        // A device thread inside an access section holds the old state: the
        // two-phase unmap reports it until the section ends.
        let section = net_t.access();
        let (bytes, mut ticket) = iommu.ioas_unmap_begin(ioas, 0x10000, 128 * KIB)?;
        let pending_now = ticket.pending();
        println!(
            "    unmap of {bytes:#x} bytes started; translators still in a section: {:?}",
            pending_now.iter().map(|p| &p.label).collect::<Vec<_>>()
        );
        check(!ticket.is_done(), "the open section holds the unmap")?;
        drop(section);
        check(
            ticket.is_done(),
            "the unmap completes when the section ends",
        )?;
        println!("    section ended: unmap complete");
    }
    let (net_n, accel_n) = (net_t.cached_translations(), accel_t.cached_translations());
    println!("    cached translations after: net0 {net_n}, accel0 {accel_n}");
    check(net_n == 0 && accel_n == 0, "caches dropped")?;
    match net_t.read(None, 0x10000, &mut buf) {
        Err(e @ Error::Unmapped { .. }) => println!("    net0 read at 0x10000 now: {e}"),
        other => return Err(format!("read after unmap gave {other:?}").into()),
    }
    let total = iommu.ioas_unmap(ioas, 0, u64::MAX)?;
    println!("    unmap-all removed the remaining {total:#x} bytes");

    step(7, "tear down");
    match iommu.destroy(ioas) {
        Err(e) => println!("    destroy ioas {ioas} while HWPTs use it: {e}"),
        Ok(()) => return Err("destroying a used IOAS succeeded".into()),
    }
    iommu.detach(accel_id, None)?;
    iommu.destroy(accel_hwpt)?;
    // The fault queue handle is its fd: close it first (EBUSY while open).
    drop(faults);
    iommu.destroy(fault_id)?;
    iommu.unbind(net_id)?;
    iommu.unbind(accel_id)?;
    iommu.destroy(ioas)?;
    let mem_refs = Arc::strong_count(&mem);
    println!("    all objects destroyed; memory references left: {mem_refs}");
    println!("\niommu-walkthrough: OK");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("iommu-walkthrough FAILED: {e}");
        std::process::exit(1);
    }
}
