//! Human-readable numbers for the panes: durations, bytes, FLOPs.

/// The unit a duration reads in: (ns per unit, name, decimals shown by default).
fn time_unit(ns: f64) -> (f64, &'static str, usize) {
    let a = ns.abs();
    if a < 1e3 {
        (1.0, "ns", 0)
    } else if a < 1e6 {
        (1e3, "µs", 1)
    } else if a < 1e9 {
        (1e6, "ms", 2)
    } else {
        (1e9, "s", 2)
    }
}

/// A duration in ns as `850 ns`, `12.3 µs`, `4.56 ms` or `1.23 s`.
pub fn fmt_ns(ns: f64) -> String {
    let (unit, name, decimals) = time_unit(ns);
    format!("{:.decimals$} {name}", ns / unit)
}

/// A time in ns inside a window `span` ns wide, in [`fmt_ns`]'s unit with enough decimals
/// to resolve a tenth of the window (`8.5805 ms` in a 1 µs window at 8.58 ms, where
/// [`fmt_ns`] reads `8.58 ms` across the whole window).
pub fn fmt_ns_within(ns: f64, span: f64) -> String {
    let (unit, name, decimals) = time_unit(ns);
    let tenth = span.abs() / 10.0;
    let needed = if tenth > 0.0 && tenth.is_finite() { (unit / tenth).log10().ceil().clamp(0.0, 9.0) as usize } else { 0 };
    format!("{:.prec$} {name}", ns / unit, prec = decimals.max(needed))
}

/// Bytes as `512 B`, `3.0 KiB`, `1.25 MiB` or `2.00 GiB`.
pub fn fmt_bytes(b: u64) -> String {
    let f = b as f64;
    if b < 1024 {
        format!("{b} B")
    } else if f < 1024.0 * 1024.0 {
        format!("{:.1} KiB", f / 1024.0)
    } else if f < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} MiB", f / (1024.0 * 1024.0))
    } else {
        format!("{:.2} GiB", f / (1024.0 * 1024.0 * 1024.0))
    }
}

/// Bytes as MiB with two decimals (table cells).
pub fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// A FLOP count as `1.2 MFLOP`, `3.40 GFLOP`, ...
pub fn fmt_flops(f: u64) -> String {
    let x = f as f64;
    if x < 1e3 {
        format!("{f} FLOP")
    } else if x < 1e6 {
        format!("{:.1} kFLOP", x / 1e3)
    } else if x < 1e9 {
        format!("{:.1} MFLOP", x / 1e6)
    } else {
        format!("{:.2} GFLOP", x / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_pick_the_readable_scale() {
        assert_eq!(fmt_ns(850.0), "850 ns");
        assert_eq!(fmt_ns(12_340.0), "12.3 µs");
        assert_eq!(fmt_ns(4_560_000.0), "4.56 ms");
        assert_eq!(fmt_ns_within(8_580_500.0, 1_000.0), "8.5805 ms");
        assert_eq!(fmt_ns_within(8_580_500.0, 8_600_000.0), "8.58 ms", "a wide window keeps the usual digits");
        assert_eq!(fmt_ns_within(1_500_000_000.0, 1_000.0), "1.5000000 s");
        assert_eq!(fmt_ns_within(850.0, 1_000.0), "850 ns");
        assert_eq!(fmt_bytes(3 * 1024), "3.0 KiB");
        assert_eq!(fmt_bytes(5 * 1024 * 1024 / 4), "1.25 MiB");
        assert_eq!(fmt_flops(3_400_000_000), "3.40 GFLOP");
    }
}
