// Keep libtorch_cuda linked even though no symbol of it is referenced directly:
// without it tch::Cuda::is_available() is false on a GPU machine (docs/trainer.md "libtorch").
// Also bake an rpath to the libtorch we built against, so local runs need no
// LD_LIBRARY_PATH (which still overrides it: the GPU machine uses its own copy).
fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").ok();
    if let Some(lib) = &lib {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{lib}");
        if std::path::Path::new(lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg-bins=-ltorch_cuda");
            println!("cargo:rustc-link-arg-bins=-Wl,--as-needed");
        }
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
