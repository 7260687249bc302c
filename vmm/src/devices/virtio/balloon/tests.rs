//! The balloon as the guest driver sees it: real guest memory, real split queues, the event
//! loop and its stats timer; pages written by the "guest" read back as zero once released.

use std::sync::Arc;
use std::time::Duration;

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::{self, MmioTransport};
use crate::devices::virtio::test_utils::{wait_for, TestQueue, DATA, MEM_SIZE, OUTSIDE, WRITE};
use crate::devices::virtio::{feature, status, Interrupt, VirtioDevice, INT_CONFIG, TYPE_BALLOON};

/// Where the tests' pages live: well after the buffers at DATA.
const PAGES: u64 = DATA + 0x10_0000;
const PAGE: usize = PAGE_SIZE as usize;

/// A device activated with every offered feature but `refused`, one TestQueue per queue it
/// uses, in queue order.
fn start(stats_period: Option<Duration>, refused: u64) -> (Balloon, Vec<TestQueue>) {
    let mut balloon = Balloon::new(stats_period);
    balloon.set_acked_features(balloon.avail_features() & !refused);
    let first = TestQueue::new();
    let mut queues = vec![];
    for i in 1..balloon.active_queue_count() as u64 {
        queues.push(TestQueue::at(
            first.mem,
            first.interrupt.clone(),
            GuestAddress(i * 0x1_0000),
        ));
    }
    queues.insert(0, first);
    let wired = queues.iter().map(|q| q.queue_and_event(false)).collect();
    let q = &queues[0];
    balloon
        .activate(q.mem.clone(), q.interrupt.clone(), wired)
        .unwrap();
    (balloon, queues)
}

fn fill(q: &TestQueue, addr: u64, len: usize, byte: u8) {
    q.write(addr, &vec![byte; len]);
}

fn is_all(bytes: &[u8], byte: u8) -> bool {
    bytes.iter().all(|&b| b == byte)
}

fn pfn_list(q: &TestQueue, at: u64, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    q.write(at, &bytes);
    bytes.len() as u32
}

#[test]
fn a_reported_range_reads_back_as_zero_once_released() {
    let (balloon, mut queues) = start(None, 0);
    assert_eq!(balloon.device_type(), TYPE_BALLOON);
    let reporting = QueueLayout::new(balloon.acked_features_for_tests())
        .reporting
        .unwrap();
    assert_eq!(reporting, 2, "no stats queue: reporting is queue 2");
    let q = &mut queues[reporting];
    // Three pages of guest data, and the pages on either side, all written non-zero.
    fill(q, PAGES - PAGE as u64, 5 * PAGE, 0xa5);
    assert!(is_all(&q.read(PAGES, 3 * PAGE), 0xa5));
    // Linux reports free pages as device-writable buffers, one range each.
    let head = q.add_chain(&[
        (PAGES, PAGE as u32, WRITE),
        (PAGES + PAGE as u64, 2 * PAGE as u32, WRITE),
    ]);
    assert_eq!(q.kick(1), vec![(u32::from(head), 0)]);
    assert!(
        is_all(&q.read(PAGES, 3 * PAGE), 0),
        "MADV_DONTNEED gave them back"
    );
    assert!(
        is_all(&q.read(PAGES - PAGE as u64, PAGE), 0xa5),
        "the page before is kept"
    );
    assert!(
        is_all(&q.read(PAGES + 3 * PAGE as u64, PAGE), 0xa5),
        "the page after is kept"
    );
    assert_eq!(balloon.handle().status().reported_bytes, 3 * PAGE_SIZE);
    // The guest may use the pages again at once.
    fill(q, PAGES, PAGE, 7);
    assert!(is_all(&q.read(PAGES, PAGE), 7));
}

#[test]
fn a_reported_range_outside_memory_is_returned_untouched_and_the_device_keeps_serving() {
    let (balloon, mut queues) = start(None, 0);
    let q = &mut queues[2];
    let last = MEM_SIZE as u64 - PAGE_SIZE;
    fill(q, last, PAGE, 0x5a);
    let outside = q.add_chain(&[(OUTSIDE, PAGE as u32, WRITE)]);
    // Starts in memory, ends beyond it: refused whole, its first page is kept.
    let straddling = q.add_chain(&[(last, 2 * PAGE as u32, WRITE)]);
    assert_eq!(
        q.kick(2),
        vec![(u32::from(outside), 0), (u32::from(straddling), 0)]
    );
    assert!(is_all(&q.read(last, PAGE), 0x5a));
    assert_eq!(balloon.handle().status().reported_bytes, 0);

    fill(q, PAGES, PAGE, 1);
    let good = q.add_chain(&[(PAGES, PAGE as u32, WRITE)]);
    assert_eq!(q.kick(1), vec![(u32::from(good), 0)]);
    assert!(is_all(&q.read(PAGES, PAGE), 0));
}

#[test]
fn inflating_page_numbers_zeroes_those_pages_and_deflating_counts_them_back() {
    let (balloon, mut queues) = start(Some(Duration::from_secs(60)), 0);
    let first = (PAGES / PAGE_SIZE) as u32;
    // Pages first..first+4 and first+6 (out of order, one twice, one beyond memory).
    fill(&queues[0], PAGES, 8 * PAGE, 0xee);
    let list = [
        first + 2,
        first,
        first + 1,
        first + 6,
        first + 3,
        first,
        0x10_0000,
    ];
    let len = pfn_list(&queues[INFLATE], DATA, &list);
    let q = &mut queues[INFLATE];
    let head = q.add_chain(&[(DATA, len, 0)]);
    assert_eq!(q.kick(1), vec![(u32::from(head), 0)]);
    assert!(
        is_all(&q.read(PAGES, 4 * PAGE), 0),
        "inflated pages are released"
    );
    assert!(
        is_all(&q.read(PAGES + 4 * PAGE as u64, 2 * PAGE), 0xee),
        "pages 4 and 5 kept"
    );
    assert!(is_all(&q.read(PAGES + 6 * PAGE as u64, PAGE), 0));
    assert!(is_all(&q.read(PAGES + 7 * PAGE as u64, PAGE), 0xee));
    let status = balloon.handle().status();
    assert_eq!(status.inflated_pages, 5, "distinct pages inside memory");

    let len = pfn_list(&queues[DEFLATE], DATA + 0x1000, &[first, first + 6]);
    let q = &mut queues[DEFLATE];
    let head = q.add_chain(&[(DATA + 0x1000, len, 0)]);
    assert_eq!(q.kick(1), vec![(u32::from(head), 0)]);
    assert_eq!(balloon.handle().status().inflated_pages, 3);

    // A page list in a device-writable buffer is refused, and the device goes on.
    let q = &mut queues[INFLATE];
    let bad = q.add_chain(&[(DATA, len, WRITE)]);
    assert_eq!(q.kick(1), vec![(u32::from(bad), 0)]);
    assert_eq!(balloon.handle().status().inflated_pages, 3);
}

fn stats_buffer(entries: &[(u16, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|(tag, value)| {
            let mut entry = tag.to_le_bytes().to_vec();
            entry.extend_from_slice(&value.to_le_bytes());
            entry
        })
        .collect()
}

#[test]
fn the_stats_buffer_is_parsed_held_and_returned_on_the_timer_for_a_refill() {
    let period = Duration::from_millis(500);
    let (balloon, mut queues) = start(Some(period), 0);
    let layout = QueueLayout::new(balloon.acked_features_for_tests());
    assert_eq!(
        layout,
        QueueLayout {
            stats: Some(2),
            reporting: Some(3)
        }
    );
    let handle = balloon.handle();
    let q = &mut queues[2];
    let first = stats_buffer(&[
        (tags::MEMFREE, 100 << 20),
        (tags::MEMTOT, 2 << 30),
        (tags::AVAIL, 1 << 30),
        (tags::MAJFLT, 12),
        (999, 5),
    ]);
    q.write(DATA, &first);
    let head = q.add_chain(&[(DATA, first.len() as u32, 0)]);
    q.notify();
    wait_for(
        || handle.status().stats.free_memory_bytes.is_some(),
        "the stats",
    );
    let stats = handle.status().stats;
    assert_eq!(stats.free_memory_bytes, Some(100 << 20));
    assert_eq!(stats.total_memory_bytes, Some(2 << 30));
    assert_eq!(stats.available_memory_bytes, Some(1 << 30));
    assert_eq!(stats.major_faults, Some(12));
    assert_eq!(stats.swap_in_bytes, None, "not reported");
    assert_eq!(q.mock.used().idx().load(), 0, "the buffer is held");

    // The timer hands it back so that the guest refills it.
    assert_eq!(q.wait_used(1), vec![(u32::from(head), 0)]);
    let second = stats_buffer(&[(tags::MEMFREE, 50 << 20), (tags::SWAP_OUT, 4096)]);
    q.write(DATA, &second);
    let again = q.add_chain(&[(DATA, second.len() as u32, 0)]);
    q.notify();
    wait_for(
        || handle.status().stats.free_memory_bytes == Some(50 << 20),
        "the new stats",
    );
    let stats = handle.status().stats;
    assert_eq!(stats.swap_out_bytes, Some(4096));
    assert_eq!(
        stats.total_memory_bytes,
        Some(2 << 30),
        "the latest of each is kept"
    );
    assert_eq!(q.wait_used(1), vec![(u32::from(again), 0)]);
}

#[test]
fn stats_parsing_takes_whole_entries_only() {
    let mut stats = berth_machine::BalloonStats::default();
    let mut bytes = stats_buffer(&[(tags::CACHES, 3), (tags::HTLB_PGFAIL, 4)]);
    bytes.extend_from_slice(&[tags::MEMTOT as u8, 0, 1, 2]);
    assert_eq!(parse_stats(&bytes, &mut stats), 2);
    assert_eq!(stats.disk_caches_bytes, Some(3));
    assert_eq!(stats.hugetlb_failures, Some(4));
    assert_eq!(stats.total_memory_bytes, None);
}

#[test]
fn a_new_target_raises_a_config_change_and_the_config_space_reads_it_back() {
    let mut balloon = Balloon::new(None);
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    balloon.attach_interrupt(&interrupt);
    let read = |balloon: &Balloon, offset| {
        let mut data = [0u8; 4];
        balloon.read_config(offset, &mut data);
        u32::from_le_bytes(data)
    };
    assert_eq!(read(&balloon, 0), 0);
    let generation = interrupt.config_generation();
    balloon.handle().set_target_pages(512 * 256);
    assert_eq!(interrupt.status(), INT_CONFIG);
    assert_eq!(interrupt.irq().read().unwrap(), 1);
    assert_ne!(interrupt.config_generation(), generation);
    assert_eq!(read(&balloon, 0), 512 * 256);
    // The guest writes `actual`; `num_pages` is the host's.
    balloon.write_config(4, &1000u32.to_le_bytes());
    balloon.write_config(0, &7u32.to_le_bytes());
    assert_eq!(read(&balloon, 4), 1000);
    assert_eq!(read(&balloon, 0), 512 * 256);
    let status = balloon.handle().status();
    assert_eq!(
        (status.target_pages, status.actual_pages),
        (512 * 256, 1000)
    );
    // Past the two fields the space reads zero.
    assert_eq!(read(&balloon, 8), 0);
}

#[test]
fn the_acked_features_decide_the_queue_indexes() {
    let stats = feature(features::STATS_VQ);
    let reporting = feature(features::REPORTING);
    let layout = |acked| QueueLayout::new(acked);
    assert_eq!(
        layout(stats | reporting),
        QueueLayout {
            stats: Some(2),
            reporting: Some(3)
        }
    );
    assert_eq!(
        layout(reporting),
        QueueLayout {
            stats: None,
            reporting: Some(2)
        }
    );
    assert_eq!(
        layout(stats),
        QueueLayout {
            stats: Some(2),
            reporting: None
        }
    );
    assert_eq!(layout(0).count(), 2);
    // Without a stats period the device does not offer the stats queue.
    assert_eq!(Balloon::new(None).avail_features() & stats, 0);
    assert_ne!(
        Balloon::new(Some(Duration::from_secs(5))).avail_features() & stats,
        0
    );
}

/// Through the transport, as Linux does it without STATS_VQ: queues 0, 1 and 2 (reporting) set
/// up, queue 3 left alone; DRIVER_OK activates, and a report on queue 2 is served.
#[test]
fn a_driver_without_stats_sets_up_three_queues_and_reports_on_queue_2() {
    let first = TestQueue::new();
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut rings: Vec<TestQueue> = (0..3)
        .map(|i| {
            TestQueue::at(
                first.mem,
                interrupt.clone(),
                GuestAddress(0x2_0000 + i * 0x1_0000),
            )
        })
        .collect();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let balloon = Balloon::new(Some(Duration::from_secs(5)));
    let mut t = MmioTransport::new(first.mem.clone(), Box::new(balloon), irq).unwrap();
    let write =
        |t: &mut MmioTransport, offset: u64, value: u32| t.write(offset, &value.to_le_bytes());
    let read = |t: &mut MmioTransport, offset: u64| {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    };
    assert_eq!(read(&mut t, mmio::DEVICE_ID_OFFSET), TYPE_BALLOON);
    let ack_driver = status::ACKNOWLEDGE | status::DRIVER;
    write(&mut t, mmio::STATUS_OFFSET, status::ACKNOWLEDGE);
    write(&mut t, mmio::STATUS_OFFSET, ack_driver);
    let acked = feature(crate::devices::virtio::features::VERSION_1) | feature(features::REPORTING);
    for page in 0..2 {
        write(&mut t, mmio::DRIVER_FEATURES_SEL_OFFSET, page);
        write(
            &mut t,
            mmio::DRIVER_FEATURES_OFFSET,
            (acked >> (32 * page)) as u32,
        );
    }
    write(
        &mut t,
        mmio::STATUS_OFFSET,
        ack_driver | status::FEATURES_OK,
    );
    for (index, ring) in rings.iter().enumerate() {
        write(&mut t, mmio::QUEUE_SEL_OFFSET, index as u32);
        write(&mut t, mmio::QUEUE_NUM_OFFSET, u32::from(QUEUE_SIZE));
        for (offset, addr) in [
            (mmio::QUEUE_DESC_LOW_OFFSET, ring.mock.desc_table_addr()),
            (mmio::QUEUE_DRIVER_LOW_OFFSET, ring.mock.avail_addr()),
            (mmio::QUEUE_DEVICE_LOW_OFFSET, ring.mock.used_addr()),
        ] {
            write(&mut t, offset, addr.0 as u32);
            write(&mut t, offset + 4, (addr.0 >> 32) as u32);
        }
        write(&mut t, mmio::QUEUE_READY_OFFSET, 1);
    }
    let full = ack_driver | status::FEATURES_OK | status::DRIVER_OK;
    write(&mut t, mmio::STATUS_OFFSET, full);
    assert_eq!(
        read(&mut t, mmio::STATUS_OFFSET),
        full,
        "activated, no NEEDS_RESET"
    );

    let q = &mut rings[2];
    fill(q, PAGES, PAGE, 0x33);
    let head = q.add_chain(&[(PAGES, PAGE as u32, WRITE)]);
    t.queue_notify_events()[2].write(1).unwrap();
    assert_eq!(q.wait_used(1), vec![(u32::from(head), 0)]);
    assert!(is_all(&q.read(PAGES, PAGE), 0));
    write(&mut t, mmio::STATUS_OFFSET, 0);
}
