"""ELF and kernel-module closures on real Debian packages; content hashes of the cache."""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from rackboot import elf, modules
from rackboot.errors import RackbootError
from rackboot.sources import PackageCache, content_hash

pytestmark = pytest.mark.network

LOADERS = {"arm64": "ld-linux-aarch64.so.1", "armhf": "ld-linux-armhf.so.3"}
TRIPLETS = {"arm64": "aarch64-linux-gnu", "armhf": "arm-linux-gnueabihf"}


def sysroot_of(arch: str, *packages: str) -> Path:
    cache = PackageCache(arch=arch)
    return cache.sysroot(cache.resolve(list(packages)))


@pytest.fixture(scope="module", params=["arm64", "armhf"])
def python_root(request) -> tuple[str, Path]:
    return request.param, sysroot_of(request.param, "python3.11-minimal")


@pytest.fixture(scope="module")
def busybox_root() -> Path:
    return sysroot_of("arm64", "busybox-static")


@pytest.fixture(scope="module")
def kernel_root() -> Path:
    """The versioned image package that Debian's linux-image-arm64 metapackage depends on."""
    cache = PackageCache(arch="arm64")
    meta = cache.resolve(["linux-image-arm64"], with_depends=False)[0]
    image = next(d for d in meta.depends if d.startswith("linux-image-") and d[12:13].isdigit())
    return cache.unpack(cache.resolve([image], with_depends=False)[0])


def test_python_closure_holds_its_loader_libc_and_libraries(python_root):
    arch, root = python_root
    paths = elf.closure(["python3.11"], root, arch)
    names = {Path(p).name for p in paths}
    assert {LOADERS[arch], "libc.so.6", "libz.so.1", "libexpat.so.1", "libm.so.6"} <= names
    assert "/usr/bin/python3.11" in paths
    assert elf.read_elf_info(root / "usr/bin/python3.11").interp in paths  # PT_INTERP, as written
    assert paths == sorted(set(paths))
    for p in paths:
        info = elf.read_elf_info(root / elf.resolve_in_sysroot(root, p)[0].lstrip("/"))
        assert (info.elf_class, info.machine) == elf.ARCHES[arch][:2], p
    assert not any(f"/{TRIPLETS['armhf' if arch == 'arm64' else 'arm64']}/" in p for p in paths)


def test_python_closure_keeps_symlinks_and_their_targets(python_root):
    arch, root = python_root
    paths = elf.closure(["/usr/bin/python3.11"], root, arch)
    links = [p for p in paths if (root / p.lstrip("/")).is_symlink()]
    libz = f"/lib/{TRIPLETS[arch]}/libz.so.1"
    assert libz in links, "the soname link is reported as itself, not replaced by its target"
    assert any(Path(p).name.startswith("libz.so.1.") and (root / p.lstrip("/")).is_file() for p in paths)
    for link in links:
        final, _ = elf.resolve_in_sysroot(root, link)
        assert final in paths and not (root / final.lstrip("/")).is_symlink(), link


def test_busybox_static_closure_is_the_binary_alone(busybox_root):
    info = elf.read_elf_info(busybox_root / "bin/busybox")
    assert info.interp is None and info.needed == ()
    assert elf.closure(["busybox"], busybox_root, "arm64") == ["/bin/busybox"]


@pytest.mark.parametrize("case", ["host-ls-for-arm64", "arm64-busybox-for-armhf"])
def test_wrong_arch_binary_is_refused_naming_file_and_arch(case, busybox_root, tmp_path):
    if case == "host-ls-for-arm64":
        (tmp_path / "usr/bin").mkdir(parents=True)
        shutil.copy(os.path.realpath("/bin/ls"), tmp_path / "usr/bin/hostls")
        root, binary, arch, machine = tmp_path, "/usr/bin/hostls", "arm64", "x86_64"
    else:
        root, binary, arch, machine = busybox_root, "/bin/busybox", "armhf", "aarch64"
    with pytest.raises(RackbootError) as err:
        elf.closure([binary], root, arch)
    assert binary in str(err.value) and f"not {arch}" in str(err.value) and machine in str(err.value)


def test_missing_needed_library_is_named(python_root, tmp_path):
    arch, root = python_root
    for p in elf.closure(["/usr/bin/python3.11"], root, arch):
        if "libexpat" in p:
            continue
        src, dst = root / p.lstrip("/"), tmp_path / p.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
    with pytest.raises(RackbootError, match=r"^libexpat\.so\.1, needed by /usr/bin/python3\.11, not found"):
        elf.closure(["/usr/bin/python3.11"], tmp_path, arch)


def names(closure: modules.ModuleClosure) -> list[str]:
    return [m.name for m in closure.modules]


def test_virtio_net_pulls_failover_then_net_failover_before_it(kernel_root):
    order = names(modules.module_closure(["virtio_net"], kernel_root, arch="arm64"))
    assert order == ["failover", "net_failover", "virtio_net"]


def test_module_load_order_is_deterministic(kernel_root):
    wanted = ["virtio_net", "ext4", "overlay", "virtio_blk"]
    first = modules.module_closure(wanted, kernel_root)
    again = modules.module_closure(["virtio-blk", *reversed(wanted), "ext4"], kernel_root)
    assert first == again
    order = names(first)
    for module in first.modules:
        assert all(order.index(dep) < order.index(module.name) for dep in module.depends), module


def test_misspelt_module_suggests_the_real_name(kernel_root):
    with pytest.raises(RackbootError, match=r"'virtio_nett' not found.*did you mean 'virtio_net'\?"):
        modules.module_closure(["virtio_nett"], kernel_root)


def test_builtin_module_is_listed_as_builtin_not_as_a_file(kernel_root):
    kernel = modules.KernelModules(kernel_root)
    assert "unix" in kernel.builtin and "unix" not in kernel.index  # af_unix is built in on Debian arm64
    closure = modules.module_closure(["unix", "virtio_net"], kernel_root)
    assert closure.builtin == ("unix",)
    assert "unix" not in names(closure) and not any("unix" in m.path for m in closure.modules)


def test_load_order_text_lists_plain_ko_paths_even_for_compressed_modules(kernel_root, tmp_path):
    kver = modules.KernelModules(kernel_root).kver
    for m in modules.module_closure(["virtio_net"], kernel_root).modules:  # an xz-compressed copy
        dst = tmp_path / (m.path + ".xz")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(lzma.compress((kernel_root / m.path).read_bytes(), format=lzma.FORMAT_XZ))
    closure = modules.module_closure(["virtio_net"], tmp_path, kver, arch="arm64")
    assert all(m.path.endswith(".ko.xz") for m in closure.modules)
    assert modules.load_order_text(closure).splitlines() == [
        f"lib/modules/{kver}/kernel/net/core/failover.ko",
        f"lib/modules/{kver}/kernel/drivers/net/net_failover.ko",
        f"lib/modules/{kver}/kernel/drivers/net/virtio_net.ko",
    ]


def test_copy_subset_writes_transitive_modules_dep_that_kmod_agrees_with(kernel_root, tmp_path):
    closure = modules.module_closure(["ext4", "overlay", "virtio_net"], kernel_root, arch="arm64")
    dest = tmp_path / "lib/modules" / closure.kver
    modules.copy_subset(closure, kernel_root, dest)
    dep = {}
    for line in (dest / "modules.dep").read_text().splitlines():
        path, _, deps = line.partition(":")
        dep[modules.module_name(Path(path))] = [modules.module_name(Path(d)) for d in deps.split()]
        assert (dest / path).is_file() and all((dest / d).is_file() for d in deps.split()), line
    assert set(dep) == set(names(closure))
    assert sorted(dep["ext4"]) == ["crc16", "jbd2", "mbcache"]  # all three are modules in Debian's 6.1
    assert sorted(dep["virtio_net"]) == ["failover", "net_failover"], "dependencies of dependencies too"
    assert dep["overlay"] == [] and dep["failover"] == []
    order = [modules.module_name(Path(p)) for p in (dest / "modules.order").read_text().split()]
    assert order == names(closure)
    if not shutil.which("modprobe"):
        pytest.skip("kmod's modprobe is not installed")
    for name, deps in dep.items():
        shown = subprocess.run(
            ["modprobe", "--dirname", tmp_path, "--set-version", closure.kver, "--show-depends", name],
            capture_output=True,
            text=True,
        )
        assert shown.returncode == 0, shown.stderr
        loaded = {
            modules.module_name(Path(line.split()[1]))
            for line in shown.stdout.splitlines()
            if line.startswith("insmod ")
        }
        assert loaded == {name, *deps}, name


def test_content_hash_follows_bytes_not_mtimes(tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    f = tree / "sub/module.ko"
    f.write_bytes(b"\x7fELF one")
    before = content_hash(f), content_hash(tree)
    os.utime(f, (1_000_000, 1_000_000))
    os.utime(tree / "sub", (2_000_000, 2_000_000))
    assert (content_hash(f), content_hash(tree)) == before
    f.write_bytes(b"\x7fELF two")  # same length, other bytes
    os.utime(f, (1_000_000, 1_000_000))
    after = content_hash(f), content_hash(tree)
    assert after[0] != before[0] and after[1] != before[1]


# --- paths from the config or a package stay inside their root ---------------------------


def copy_closure(root: Path, dest: Path, arch: str, binary: str = "/usr/bin/python3.11") -> None:
    for p in elf.closure([binary], root, arch):
        src, dst = root / p.lstrip("/"), dest / p.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)


def outside_copy(tmp_path: Path, source: Path) -> Path:
    """A real, readable file of the right arch next to (not inside) the sysroot."""
    (tmp_path / "outside").mkdir(exist_ok=True)
    return Path(shutil.copy(source, tmp_path / "outside" / source.name))


@pytest.mark.parametrize("binary", ["/bin/../../outside/busybox", "/../outside/busybox", "../../outside/busybox"])
def test_a_binary_path_that_climbs_out_of_the_sysroot_is_refused(busybox_root, tmp_path, binary):
    """It used to be read from the host (and copied to the same place outside the stage)."""
    sysroot = tmp_path / "sysroot"
    copy_closure(busybox_root, sysroot, "arm64", "/bin/busybox")
    outside_copy(tmp_path, busybox_root / "bin/busybox")
    with pytest.raises(RackbootError, match=r"leads out of .*sysroot; refusing") as err:
        elf.closure([binary], sysroot, "arm64")
    assert binary in str(err.value) and "\n" not in str(err.value)


def test_a_package_link_out_of_the_sysroot_is_refused_naming_the_link(python_root, tmp_path):
    arch, root = python_root
    sysroot = tmp_path / "sysroot"
    copy_closure(root, sysroot, arch)
    libz = sysroot / f"lib/{TRIPLETS[arch]}/libz.so.1"
    libz.unlink()
    libz.symlink_to("../../../outside/libz.so.1")  # out of the sysroot, where the host's root would be
    with pytest.raises(
        RackbootError,
        match=rf"^libz\.so\.1, needed by /usr/bin/python3\.11: .* leads out of "
        rf".* through the link /lib/{TRIPLETS[arch]}/libz\.so\.1",
    ):
        elf.closure(["/usr/bin/python3.11"], sysroot, arch)


def test_an_interpreter_link_out_of_the_sysroot_is_refused(python_root, tmp_path):
    arch, root = python_root
    sysroot = tmp_path / "sysroot"
    copy_closure(root, sysroot, arch)
    interp = elf.read_elf_info(sysroot / "usr/bin/python3.11").interp
    loader = sysroot / interp.lstrip("/")
    loader.unlink()
    loader.symlink_to("../" * 6 + "outside/loader")
    with pytest.raises(RackbootError, match=r"leads out of .* \(the interpreter of /usr/bin/python3\.11\)"):
        elf.closure(["/usr/bin/python3.11"], sysroot, arch)


def test_absolute_links_resolve_inside_the_sysroot_not_on_the_host(busybox_root, tmp_path):
    sysroot = tmp_path / "sysroot"
    copy_closure(busybox_root, sysroot, "arm64", "/bin/busybox")
    outside = outside_copy(tmp_path, busybox_root / "bin/busybox")
    (sysroot / "sbin").mkdir()
    (sysroot / "sbin/tool").symlink_to(outside)  # an absolute path: inside the sysroot it does not exist
    with pytest.raises(RackbootError, match=rf"/sbin/tool does not exist in {sysroot}"):
        elf.closure(["/sbin/tool"], sysroot, "arm64")
    (sysroot / "sbin/tool").unlink()
    (sysroot / "sbin/tool").symlink_to("/bin/busybox")
    assert elf.closure(["/sbin/tool"], sysroot, "arm64") == ["/bin/busybox", "/sbin/tool"]


def test_ld_so_conf_includes_are_read_inside_the_sysroot(tmp_path):
    sysroot = tmp_path / "sysroot"
    (sysroot / "etc/ld.so.conf.d").mkdir(parents=True)
    (sysroot / "etc/ld.so.conf").write_text("include ld.so.conf.d/*.conf\ninclude /etc/ld.so.conf\n/opt/lib\n")
    (sysroot / "etc/ld.so.conf.d/a.conf").write_text("/usr/local/lib\n")
    assert elf.ld_so_conf_paths(sysroot) == ("/usr/local/lib", "/opt/lib")  # the self-include ends
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/host.conf").write_text("/host/lib\n")
    escaping = tmp_path / "escaping"
    (escaping / "etc").mkdir(parents=True)
    (escaping / "etc/ld.so.conf").write_text("include ../../outside/*.conf\n")
    with pytest.raises(RackbootError, match="leads out of"):
        elf.ld_so_conf_paths(escaping)


def test_kernel_tree_links_are_followed_inside_it(kernel_root, tmp_path):
    """A local kernel tree whose lib points at an absolute /usr/lib must not hand over the
    host's modules (here a stand-in 'host' directory)."""
    kver = modules.KernelModules(kernel_root).kver
    host = tmp_path / "host"
    (host / "modules" / kver / "kernel").mkdir(parents=True)
    shutil.copy(
        kernel_root / modules.KernelModules(kernel_root).index["failover"].relative_to(kernel_root),
        host / "modules" / kver / "kernel",
    )
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "lib").symlink_to(host)
    with pytest.raises(RackbootError, match="expected one kernel release under .*tree/.*found none"):
        modules.module_closure(["failover"], tree)
    inside = tree / str(host).lstrip("/") / "modules" / kver
    inside.mkdir(parents=True)
    assert modules.KernelModules(tree).index == {}  # the tree's own (empty) modules, not the host's


def test_a_module_link_out_of_the_kernel_tree_is_refused(kernel_root, tmp_path):
    kver = modules.KernelModules(kernel_root).kver
    tree = tmp_path / "tree"
    (tree / "lib/modules" / kver / "kernel").mkdir(parents=True)
    (tree / "lib/modules" / kver / "kernel/evil.ko").symlink_to("../" * 8 + "outside/evil.ko")
    with pytest.raises(RackbootError, match=r"kernel module .*evil\.ko: .* leads out of"):
        modules.module_closure(["evil"], tree)


def test_merging_package_trees_follows_links_inside_the_tree_not_on_the_host(tmp_path):
    """One package's absolute lib link used to carry the next package's files into the host."""
    from rackboot import initramfs_tree, sources

    host = tmp_path / "host-lib"
    host.mkdir()
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    (first / "lib").symlink_to(host)
    (second / "lib/sub").mkdir(parents=True)
    (second / "lib/sub/foo.so").write_text("from the second package\n")
    (second / "lib/bar").symlink_to("sub/foo.so")
    dest = initramfs_tree.merge_trees([first, second], tmp_path / "merged")
    assert list(host.iterdir()) == []
    inside = dest / str(host).lstrip("/")
    assert (inside / "sub/foo.so").read_text() == "from the second package\n"
    assert os.readlink(inside / "bar") == "sub/foo.so"
    escaping = tmp_path / "escaping"
    escaping.mkdir()
    (escaping / "lib").symlink_to("../../../../../../outside")
    with pytest.raises(RackbootError, match="leads out of"):
        sources.merge_tree(second, initramfs_tree.merge_trees([escaping], tmp_path / "merged2"))


def test_merge_tree_lays_real_packages_out_as_the_cached_sysroot(python_root, tmp_path):
    """The merge that replaced shutil.copytree gives the same tree on Debian's packages."""
    from rackboot import sources

    arch, root = python_root
    cache = PackageCache(arch=arch)
    dest = tmp_path / "merged"
    for ref in sorted(cache.resolve(["python3.11-minimal"]), key=lambda r: r.name):
        sources.merge_tree(cache.unpack(ref), dest)
    assert content_hash(dest) == content_hash(root)
