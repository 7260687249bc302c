#!/bin/sh
# What a build or a test run needs of a shared folder: run by tests/e2e/ports-shares.sh in a
# container (busybox sh, with fs-check) as `share-semantics.sh DIR HOST_XATTR`, DIR on a share,
# HOST_XATTR what `fs-check xattr` printed on the host. One `sem ok NAME` or `sem FAIL NAME` line
# per property; the exit status is 1 when one failed.
d=$1
host_xattr=$2
cd "$d" || exit 1
ok() { echo "sem ok $1"; }
bad() { echo "sem FAIL $1"; fail=1; }
fail=0
echo old > a; echo new > b; mv b a && [ "$(cat a)" = new ] && [ ! -e b ] && ok rename-over || bad rename-over
echo gone > open.txt; exec 3< open.txt; rm open.txt; [ "$(cat <&3)" = gone ] && [ ! -e open.txt ] && ok unlink-open || bad unlink-open; exec 3<&-
dd if=/dev/zero of=sparse bs=1 count=1 seek=5368709120 2>/dev/null && [ "$(stat -c %s sparse)" = 5368709121 ] && ok big-sparse || bad big-sparse
[ "$(stat -c %b sparse)" -lt 1024 ] && ok sparse-blocks || bad "sparse-blocks $(stat -c %b sparse)"
rm -f sparse
long=$(printf 'n%.0s' $(seq 255)); echo x > "$long" && [ -e "$long" ] && ok long-name || bad long-name; rm -f "$long"
odd=$(printf 'caf\351-\377'); echo x > "$odd" && [ "$(ls | grep -c caf)" = 1 ] && ok non-utf8-name || bad non-utf8-name; rm -f "$odd"
fs-check locks . && ok flock-excludes || bad flock-excludes
fs-check mmap . && ok mmap || bad mmap
fs-check big . && ok past-4GiB || bad past-4GiB
guest_xattr=$(fs-check xattr . 2>&1); echo "xattr on the host: $host_xattr; on the share: $guest_xattr"
[ "$guest_xattr" = "$host_xattr" ] && ok xattr || bad xattr
dd if=/dev/urandom of=r bs=4096 count=16 2>/dev/null; sync; [ "$(sha256sum < r)" = "$(cat r | sha256sum)" ] && ok fsync-read || bad fsync-read
ln -s a link && [ "$(readlink link)" = a ] && [ "$(cat link)" = new ] && ok symlink-in-share || bad symlink-in-share
ln a hard && [ "$(stat -c %h a)" = 2 ] && ok hard-link || bad hard-link
mkdir -p x/y && mv x z && [ -d z/y ] && ok rename-dir || bad rename-dir
chmod 755 a && [ "$(stat -c %a a)" = 755 ] && ok chmod || bad chmod
exit $fail
