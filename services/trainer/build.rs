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
    attention_backend(lib.as_deref());
}

// model/attention_backend.cpp: the one libtorch setting tch has no binding for, compiled
// against libtorch's headers (beside its lib directory), as torch-sys compiles its own C++.
fn attention_backend(lib: Option<&str>) {
    let source = "src/model/attention_backend.cpp";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let include = std::path::Path::new(lib.expect("torch-sys reports libtorch's lib directory"))
        .join("../include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file(source)
        .compile("loraforge_attention_backend");
}
