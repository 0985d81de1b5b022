// Keep libtorch_cuda linked even though no symbol of it is referenced directly:
// without it tch::Cuda::is_available() is false on a GPU machine (docs/trainer.md "libtorch").
// Also bake an rpath to the libtorch we built against, so local runs need no
// LD_LIBRARY_PATH (which still overrides it: the GPU machine uses its own copy).
// And compile the one libtorch call tch does not bind (src/model/backward_with_grad.cpp)
// against that libtorch's headers, with the C++ ABI torch-sys builds with.
fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").ok();
    println!("cargo::rustc-check-cfg=cfg(backward_with_grad)");
    if let Some(lib) = &lib {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{lib}");
        if std::path::Path::new(lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg-bins=-ltorch_cuda");
            println!("cargo:rustc-link-arg-bins=-Wl,--as-needed");
        }
        let include = std::path::Path::new(lib).join("../include");
        if include.join("torch/csrc/autograd/autograd.h").exists() {
            let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
            cc::Build::new()
                .cpp(true)
                .file("src/model/backward_with_grad.cpp")
                .include(&include)
                .include(include.join("torch/csrc/api/include"))
                .flag("-std=c++17")
                .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
                .warnings(false)
                .compile("loraforge_backward_with_grad");
            println!("cargo:rustc-cfg=backward_with_grad");
        }
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=src/model/backward_with_grad.cpp");
}
