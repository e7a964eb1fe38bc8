//! Every opcode's success path and its error statuses, through the daemon.

mod common;

use common::{pattern, Daemon};
use sva_accel::client::{ops, Client};
use sva_accel::crc::crc32c;
use sva_accel::desc::{flags, opcode, status, Descriptor, CRC_READ_SEED};

#[test]
fn test_memmove_sizes_and_overlap() {
    let d = Daemon::shared();
    let c = Client::connect(&d.socket).expect("connect");
    // The default connection goes through the daemon's /dev/iommu service
    // (an IOAS of its session).
    assert_ne!(c.ioas(), 0);
    let src = c.alloc(1 << 20).expect("alloc");
    let dst = c.alloc(1 << 20).expect("alloc");
    for len in [1usize, 64, 4095, 4096, 65536, 1 << 20] {
        let data = pattern(len, len as u8);
        src.write(0, &data);
        let cr = c.mem_move(dst.addr(), src.addr(), len as u32).expect("run");
        assert_eq!(
            (cr.status, cr.result, cr.bytes_completed),
            (status::SUCCESS, 0, len as u32)
        );
        assert_eq!(dst.to_vec(0, len), data, "len {len}");
    }
    // Overlapping upwards: descending copy, result 1.
    let data = pattern(10000, 3);
    src.write(0, &data);
    let cr = c.mem_move(src.at(1000), src.addr(), 10000).expect("run");
    assert_eq!((cr.status, cr.result), (status::SUCCESS, 1));
    assert_eq!(src.to_vec(1000, 10000), data);
}

#[test]
fn test_fill_compare_compval() {
    let d = Daemon::shared();
    let c = Client::connect(&d.socket).expect("connect");
    let a = c.alloc(8192).expect("alloc");
    let b = c.alloc(8192).expect("alloc");
    let cr = c.fill(a.at(3), 0x8877_6655_4433_2211, 5000).expect("fill");
    assert_eq!(cr.status, status::SUCCESS);
    let got = a.to_vec(3, 5000);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, v)| *v == 0x11 * ((i % 8) as u8 + 1)));
    let cr = c
        .compare_pattern(a.at(3), 0x8877_6655_4433_2211, 5000)
        .expect("compval");
    assert_eq!((cr.status, cr.result), (status::SUCCESS, 0));
    a.write(3 + 4321, &[0]);
    let cr = c
        .compare_pattern(a.at(3), 0x8877_6655_4433_2211, 5000)
        .expect("compval");
    assert_eq!((cr.result, cr.bytes_completed), (1, 4321));
    let data = pattern(8192, 9);
    a.write(0, &data);
    b.write(0, &data);
    assert_eq!(c.compare(a.addr(), b.addr(), 8192).expect("cmp").result, 0);
    b.write(7000, &[!data[7000]]);
    let cr = c.compare(a.addr(), b.addr(), 8192).expect("cmp");
    assert_eq!(
        (cr.status, cr.result, cr.bytes_completed),
        (status::SUCCESS, 1, 7000)
    );
    // Check result with expected 0: false predicate.
    let mut d = ops::compare(a.addr(), b.addr(), 8192);
    d.flags |= flags::CR;
    assert_eq!(c.run(d).expect("run").status, status::SUCCESS_PRED);
}

#[test]
fn test_crc_copy_crc_dualcast_cflush_noop_drain() {
    let d = Daemon::shared();
    let c = Client::connect(&d.socket).expect("connect");
    let a = c.alloc(3 * 4096).expect("alloc");
    let b = c.alloc(3 * 4096).expect("alloc");
    a.write(0, b"123456789");
    let cr = c.crc(a.addr(), 9, 0).expect("crc");
    assert_eq!((cr.status, cr.crc_val()), (status::SUCCESS, 0xe306_9283));
    let data = pattern(4000, 1);
    a.write(0, &data);
    let cr = c.copy_crc(b.addr(), a.addr(), 4000, 0).expect("copy crc");
    assert_eq!(cr.crc_val(), crc32c(0, &data));
    assert_eq!(b.to_vec(0, 4000), data);
    // Seed read from memory.
    b.write(8192, &crc32c(0, &data[..100]).to_le_bytes());
    let mut s = ops::crc(a.at(100), 3900, 0);
    s.flags |= CRC_READ_SEED;
    s.set_op_u64(8, b.at(8192));
    assert_eq!(c.run(s).expect("crc").crc_val(), crc32c(0, &data));
    s.set_op_u64(8, b.at(8193));
    assert_eq!(c.run(s).expect("crc").status, status::ADDR_ALIGN);
    // Dualcast to two destinations with equal low 12 bits.
    let cr = c
        .dualcast(b.at(16), b.at(4096 + 16), a.addr(), 2000)
        .expect("dualcast");
    assert_eq!(cr.status, status::SUCCESS);
    assert_eq!(b.to_vec(16, 2000), data[..2000].to_vec());
    assert_eq!(b.to_vec(4096 + 16, 2000), data[..2000].to_vec());
    assert_eq!(
        c.dualcast(b.at(16), b.at(4096 + 32), a.addr(), 100)
            .expect("dc")
            .status,
        status::DCAST_ERR
    );
    assert_eq!(
        c.dualcast(b.at(16), b.at(16), a.addr(), 100)
            .expect("dc")
            .status,
        status::OVERLAP_BUFFERS
    );
    assert_eq!(
        c.copy_crc(a.at(10), a.addr(), 100, 0).expect("cc").status,
        status::OVERLAP_BUFFERS
    );
    assert_eq!(
        c.cache_flush(a.addr(), 3 * 4096).expect("cflush").status,
        status::SUCCESS
    );
    assert_eq!(
        c.run(Descriptor::new(opcode::NOOP, 0))
            .expect("noop")
            .status,
        status::SUCCESS
    );
    assert_eq!(c.drain().expect("drain").status, status::SUCCESS);
}

#[test]
fn test_delta_create_apply_and_errors() {
    let d = Daemon::shared();
    let c = Client::connect(&d.socket).expect("connect");
    let a = c.alloc(4096).expect("alloc");
    let b = c.alloc(4096).expect("alloc");
    let rec = c.alloc(4096).expect("alloc");
    let data = pattern(4096, 2);
    let mut changed = data.clone();
    changed[8] ^= 1;
    changed[4000] ^= 1;
    a.write(0, &data);
    b.write(0, &changed);
    let cr = c
        .create_delta(a.addr(), b.addr(), 4096, rec.addr(), 200)
        .expect("create");
    assert_eq!(
        (cr.status, cr.result, cr.delta_rec_size()),
        (status::SUCCESS, 1, 20)
    );
    let cr = c
        .apply_delta(a.addr(), 4096, rec.addr(), 20)
        .expect("apply");
    assert_eq!(cr.status, status::SUCCESS);
    assert_eq!(a.to_vec(0, 4096), changed);
    // Errors.
    assert_eq!(
        c.create_delta(a.addr(), b.addr(), 4096, rec.addr(), 15)
            .expect("e")
            .status,
        status::DR_ERANGE
    );
    assert_eq!(
        c.create_delta(a.at(4), b.addr(), 64, rec.addr(), 20)
            .expect("e")
            .status,
        status::ADDR_ALIGN
    );
    assert_eq!(
        c.create_delta(a.addr(), b.addr(), 12, rec.addr(), 20)
            .expect("e")
            .status,
        status::XFER_ERANGE
    );
    let mut bad = Vec::new();
    for off in [4u16, 2] {
        bad.extend_from_slice(&off.to_le_bytes());
        bad.extend_from_slice(&[0xee; 8]);
    }
    rec.write(0, &bad);
    assert_eq!(
        c.apply_delta(a.addr(), 4096, rec.addr(), 20)
            .expect("e")
            .status,
        status::DR_OFFSET_NOINC
    );
    rec.write(0, &1000u16.to_le_bytes());
    assert_eq!(
        c.apply_delta(a.addr(), 4096, rec.addr(), 10)
            .expect("e")
            .status,
        status::DR_OFFSET_ERANGE
    );
    assert_eq!(
        c.apply_delta(a.addr(), 4096, rec.addr(), 11)
            .expect("e")
            .status,
        status::DR_ERANGE
    );
}

#[test]
fn test_common_validation_statuses() {
    let d = Daemon::shared();
    let c = Client::connect(&d.socket).expect("connect");
    let a = c.alloc(8192).expect("alloc");
    let base = ops::mem_move(a.at(4096), a.addr(), 64);
    type Mutate = Box<dyn Fn(&mut Descriptor)>;
    let cases: Vec<(Mutate, u8)> = vec![
        (Box::new(|d| d.opcode = 0x0a), status::BAD_OPCODE),
        (Box::new(|d| d.opcode = 0x42), status::BAD_OPCODE),
        (Box::new(|d| d.privileged = true), status::PRIV_BAD),
        (Box::new(|d| d.flags |= 0x40), status::INVALID_FLAGS),
        (Box::new(|d| d.flags |= flags::CR), status::INVALID_FLAGS),
        (Box::new(|d| d.rsvd1 = 3), status::NOZERO_RESERVE),
        (Box::new(|d| d.op_specific[5] = 1), status::NOZERO_RESERVE),
        (
            Box::new(|d| d.flags |= flags::RCI),
            status::INT_HANDLE_INVAL,
        ),
        (Box::new(|d| d.xfer_size = 0), status::XFER_ERANGE),
        (Box::new(|d| d.src = u64::MAX - 8), status::XFER_ERANGE),
    ];
    for (i, (f, want)) in cases.iter().enumerate() {
        let mut d = base;
        f(&mut d);
        let cr = c.run(d).expect("run");
        assert_eq!(cr.status, *want, "case {i}");
    }
    let mut d = base;
    d.flags |= 0x40 | 0x20_0000;
    assert_eq!(c.run(d).expect("run").invalid_flags(), 0x20_0040);
    assert!(c.info().opcap.has(opcode::CFLUSH));
    assert!(!c.info().opcap.has(0x12));
}

#[test]
fn test_max_transfer_size_enforced() {
    let d = Daemon::start(&["--workers", "1", "--max-xfer", "4096"]);
    let c = Client::connect(&d.socket).expect("connect");
    let a = c.alloc(16384).expect("alloc");
    assert_eq!(c.info().max_xfer, 4096);
    assert_eq!(
        c.mem_move(a.at(8192), a.addr(), 4096).expect("ok").status,
        status::SUCCESS
    );
    assert_eq!(
        c.mem_move(a.at(8192), a.addr(), 4097).expect("ok").status,
        status::XFER_ERANGE
    );
}
