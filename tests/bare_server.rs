//! The binary starts on a bare server and draws its plots legibly there (issue 15, cases 14
//! and 17): it links no system library beyond glibc's own (an earlier build needed
//! libfontconfig and libfreetype and did not start on a fresh GPU server), and the font
//! embedded for plot text has a glyph for every character leash's plots use (a missing `j`
//! once rendered "rejected" as "re,ected").

use ab_glyph::{Font, FontRef};

/// glibc's parts, the compiler runtime and the kernel's vDSO: present on every Linux system.
const ALLOWED: &[&str] = &[
    "linux-vdso.so",
    "libc.so",
    "libm.so",
    "libgcc_s.so",
    "libpthread.so",
    "libdl.so",
    "librt.so",
    "ld-linux",
];

#[test]
fn binary_links_only_glibc() {
    let bin = env!("CARGO_BIN_EXE_leash");
    let out = std::process::Command::new("ldd")
        .arg(bin)
        .output()
        .expect("ldd (glibc's libc-bin) must be installed to check the binary's dependencies");
    assert!(out.status.success(), "ldd {bin} failed: {:?}", out);
    let text = String::from_utf8_lossy(&out.stdout);
    let libs: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert!(libs.iter().any(|l| l.contains("libc.so")), "{text}");
    for lib in libs {
        assert!(
            ALLOWED.iter().any(|a| lib.contains(a)),
            "leash links `{lib}`, which a bare server may lack"
        );
    }
}

#[test]
fn embedded_font_covers_plot_text() {
    let font = FontRef::try_from_slice(include_bytes!("../assets/fonts/DejaVuSans-leash.ttf"))
        .expect("the embedded font parses");
    // Printable ASCII (labels, numbers, metric names) and the symbols plot titles and legends
    // use (β, π‖π_ref, minus signs, ×, arrows, ∇, ±, …).
    let symbols = "βπ‖−·±×—–→∇≥θεαΔ²";
    let missing: String = (' '..='~')
        .chain(symbols.chars())
        .filter(|&c| font.glyph_id(c).0 == 0)
        .collect();
    assert!(missing.is_empty(), "no glyph for {missing:?}");
}
