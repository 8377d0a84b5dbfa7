//! scripts/install-libpool installs lib + header + pool.pc, and a C program
//! builds with `pkg-config --cflags --libs pool` alone and runs.

mod util;

use std::process::Command;

use util::*;

#[test]
fn install_and_pkg_config() {
    let dir = scratch("install");
    let prefix = dir.join("prefix");
    let root = crate_dir().parent().unwrap().parent().unwrap();
    let st = Command::new(root.join("scripts/install-libpool"))
        .arg(&prefix)
        .env("POOL_LIB_DIR", lib_dir())
        .status()
        .unwrap();
    assert!(st.success());
    for f in [
        "lib/libpool.so",
        "lib/libpool.a",
        "include/pool.h",
        "lib/pkgconfig/pool.pc",
    ] {
        assert!(prefix.join(f).exists(), "{f} not installed");
    }
    let pc = Command::new("pkg-config")
        .args(["--cflags", "--libs", "pool"])
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .output()
        .expect("pkg-config not found");
    assert!(
        pc.status.success(),
        "{}",
        String::from_utf8_lossy(&pc.stderr)
    );
    let flags = String::from_utf8(pc.stdout).unwrap();
    let src = dir.join("v.c");
    std::fs::write(
        &src,
        "#include <pool.h>\n#include <stdio.h>\nint main(void) { printf(\"%s\\n\", pool_version()); \
         return pool_selftest() < 0; }\n",
    )
    .unwrap();
    let exe = dir.join("v");
    let mut cc = Command::new("cc");
    cc.arg(&src)
        .arg("-o")
        .arg(&exe)
        .args(flags.split_whitespace());
    cc.arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()));
    assert!(cc.status().unwrap().success(), "{cc:?}");
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        env!("CARGO_PKG_VERSION")
    );
}
