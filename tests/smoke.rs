//! The basic path end to end: keystore, key, volume, mount, write, read, remount, unmount.

mod common;
use common::*;

#[test]
fn write_read_remount() {
    let Some(env) = Env::new("write_read_remount") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    std::fs::write(m.p("hello.txt"), b"hello kekfs").unwrap();
    std::fs::create_dir(m.p("sub")).unwrap();
    std::fs::write(m.p("sub/inner"), b"inner").unwrap();
    assert_eq!(std::fs::read(m.p("hello.txt")).unwrap(), b"hello kekfs");
    m.unmount();
    let m = env.mount();
    assert_eq!(std::fs::read(m.p("hello.txt")).unwrap(), b"hello kekfs");
    assert_eq!(std::fs::read(m.p("sub/inner")).unwrap(), b"inner");
    let mut names: Vec<String> = std::fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["hello.txt", "sub"]);
    m.unmount();
}
