//! The binary's global allocator: mimalloc, asked the way std asks the system allocator.
//!
//! Written here rather than taken from the `mimalloc` crate, whose `GlobalAlloc` hands every
//! request to mimalloc's aligned entry points (`mi_malloc_aligned` and friends). In mimalloc 3
//! those take their fast path only while the size class's page has a block on its immediate free
//! list, and otherwise go through the aligned generic path, which treats any block size that is
//! not a power of two as possibly misaligned and over-allocates. A request frees and allocates
//! the same sizes again every time, so that is the path most of its allocations took (callgrind,
//! `bench/instructions`: see docs/performance.md).
//!
//! `malloc` already aligns every block to the fundamental alignment (16 bytes on 64-bit targets)
//! or, for smaller blocks, to what fits in them; std's own `System` allocator relies on that and
//! calls `malloc` for such layouts. So does this, and keeps the aligned entry points for the rare
//! layout that needs more. `mi_free` releases either kind.

use libmimalloc_sys as ffi;
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

pub struct MiMalloc;

/// The alignment `malloc` gives any block at least this large (`alignof(max_align_t)`), as std's
/// `System` assumes for this target.
#[cfg(target_pointer_width = "64")]
const MIN_ALIGN: usize = 16;
#[cfg(not(target_pointer_width = "64"))]
const MIN_ALIGN: usize = 8;

/// Whether the plain entry points already satisfy `align` for a block of `size` bytes.
#[inline]
fn plain(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

// SAFETY (for every method): the layouts come from the caller under `GlobalAlloc`'s contract
// (non-zero size, power-of-two alignment); mimalloc returns null on failure, as `GlobalAlloc`
// expects; `plain` only picks the unaligned entry points where their alignment is guaranteed.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = if plain(layout.align(), layout.size()) {
            unsafe { ffi::mi_malloc(layout.size()) }
        } else {
            unsafe { ffi::mi_malloc_aligned(layout.size(), layout.align()) }
        };
        p.cast()
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = if plain(layout.align(), layout.size()) {
            unsafe { ffi::mi_zalloc(layout.size()) }
        } else {
            unsafe { ffi::mi_zalloc_aligned(layout.size(), layout.align()) }
        };
        p.cast()
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { ffi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = if plain(layout.align(), new_size) {
            unsafe { ffi::mi_realloc(ptr.cast::<c_void>(), new_size) }
        } else {
            unsafe { ffi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()) }
        };
        p.cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_gets_its_alignment_and_keeps_its_bytes() {
        let a = MiMalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [1, 7, 8, 24, 40, 48, 100, 160, 1000, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero layout; the block is written within its size and freed once.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null() && p as usize % align == 0, "alloc {size}/{align}");
                    std::ptr::write_bytes(p, 0xa5, size);
                    let grown = a.realloc(p, layout, size * 3);
                    assert!(
                        !grown.is_null() && grown as usize % align == 0,
                        "realloc {size}/{align}"
                    );
                    assert!((0..size).all(|i| *grown.add(i) == 0xa5), "realloc kept {size}/{align}");
                    a.dealloc(grown, Layout::from_size_align(size * 3, align).unwrap());
                    let z = a.alloc_zeroed(layout);
                    assert!(!z.is_null() && z as usize % align == 0, "zalloc {size}/{align}");
                    assert!((0..size).all(|i| *z.add(i) == 0), "zeroed {size}/{align}");
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
