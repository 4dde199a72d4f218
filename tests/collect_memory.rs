//! Where a `collect` sink's result lives, on glibc (a test binary of its own, without the test
//! harness: it must run on the process's main thread, whose arena is glibc's heap 0, and it sets
//! a process-wide allocator option).
//!
//! glibc gives each thread an arena and keeps a block in its arena across `realloc`. A result
//! grown from nothing on the sink's worker thread lived in that worker's arena: freed by the
//! caller, it stayed resident there for later runs whose threads may be given other arenas (the
//! peers' W2 held about 23 MB more after each run in one process). `collect()` makes the sink's
//! first buffer on the caller's thread, so the result grows in the caller's arena, as a
//! hand-written loop's would. `malloc_info` reports each arena's size, which is how this test
//! sees it: the main arena must grow by the result's size. It fails on the old sink (the main
//! arena grew by a few kilobytes, another by the result).

fn main() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    gnu::a_collected_result_is_allocated_in_the_callers_arena();
    println!("test a_collected_result_is_allocated_in_the_callers_arena ... ok");
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod gnu {
    use std::io::Read;

    use millrace::Pipeline;

    /// Each arena's `<system type="current" size="N"/>` from `malloc_info`, by heap number.
    fn arena_sizes() -> Vec<u64> {
        // SAFETY: `tmpfile` returns a new FILE (checked for null) that `malloc_info` writes to
        // and `fclose` closes once; the descriptor is duplicated first to read it back.
        let text = unsafe {
            let f = libc::tmpfile();
            assert!(!f.is_null(), "tmpfile");
            assert_eq!(libc::malloc_info(0, f), 0, "malloc_info");
            libc::fflush(f);
            let fd = libc::dup(libc::fileno(f));
            libc::fclose(f);
            assert!(fd >= 0, "dup");
            let mut file = <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd);
            std::io::Seek::rewind(&mut file).unwrap();
            let mut text = String::new();
            file.read_to_string(&mut text).unwrap();
            text
        };
        let mut sizes = Vec::new();
        for heap in text.split("<heap nr=").skip(1) {
            let current = heap
                .split("<system type=\"current\" size=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .and_then(|s| s.parse().ok())
                .expect("a heap's current size");
            sizes.push(current);
        }
        sizes
    }

    pub(super) fn a_collected_result_is_allocated_in_the_callers_arena() {
        // No block goes to `mmap` (which would bypass the arenas), so the result is in some
        // arena's heap and the arenas' sizes show which.
        // SAFETY: sets an allocator option before any other thread exists.
        assert_eq!(
            unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20) },
            1
        );
        const N: u64 = 2_000_000; // 16 MB of u64
        let before = arena_sizes();
        let p = Pipeline::new();
        // Three stages, so the sink is a worker thread's and records cross channels.
        let out = p
            .source("n", 0..N)
            .new_stage()
            .map(|x| x * 3)
            .new_stage()
            .collect();
        p.run().unwrap();
        let got = out.take();
        assert_eq!(got.len() as u64, N);
        assert_eq!(
            got.iter().copied().fold(0u64, u64::wrapping_add),
            3 * (N * (N - 1) / 2)
        );
        let after = arena_sizes();
        let main_grew = after[0].saturating_sub(before[0]);
        assert!(
            main_grew >= N * 8,
            "the main arena grew by {main_grew} bytes while the caller holds a {} byte result \
             (arenas before {before:?}, after {after:?}): the result is in a worker's arena",
            N * 8
        );
        drop(got);
    }
}
