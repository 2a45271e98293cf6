#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{map, socket_filter},
    maps::PerCpuArray,
    programs::SkBuffContext,
};

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

#[socket_filter]
pub fn nflog_filter(ctx: SkBuffContext) -> i64 {
    if let Some(seen) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *seen += 1 };
    }
    i64::from(ctx.len())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
