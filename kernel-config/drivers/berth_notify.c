// SPDX-License-Identifier: GPL-2.0
/*
 * berth_notify: raises fsnotify (inotify, fanotify) events for changes the host made to a
 * virtio-fs share, which the guest kernel cannot see by itself.
 *
 * Berth's guest agent writes one event per write(2) to /proc/berth-notify (root only):
 *
 *   create PATH | mkdir PATH | modify PATH | attrib PATH | delete PATH | rmdir PATH
 *   rename OLD<TAB>NEW
 *
 * PATH is absolute, resolved in the writer's mount namespace, with "\\" for a backslash, "\t" for
 * a tab and "\n" for a newline in a name; one trailing newline ends the line. Only FUSE and
 * virtio-fs superblocks are accepted.
 *
 * Nothing here writes to a file system. The only caches touched are the ones a FUSE revalidation
 * failure drops anyway: clean page cache of a modified file (so readers see the host's bytes) and
 * dentries of names the host created, deleted or renamed. A dentry something is mounted on is
 * never invalidated (d_invalidate would detach that mount).
 */

#include <linux/capability.h>
#include <linux/dcache.h>
#include <linux/err.h>
#include <linux/fs.h>
#include <linux/fsnotify.h>
#include <linux/init.h>
#include <linux/limits.h>
#include <linux/namei.h>
#include <linux/pagemap.h>
#include <linux/path.h>
#include <linux/proc_fs.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>

/* A rename line holds two paths. */
#define BERTH_NOTIFY_MAX_LINE (2 * PATH_MAX + 16)

/* Decodes "\\", "\t" and "\n" in place; any other escape is an error. */
static int berth_unescape(char *s)
{
	char *in = s, *out = s;

	while (*in) {
		if (*in != '\\') {
			*out++ = *in++;
			continue;
		}
		in++;
		switch (*in) {
		case '\\':
			*out++ = '\\';
			break;
		case 't':
			*out++ = '\t';
			break;
		case 'n':
			*out++ = '\n';
			break;
		default:
			return -EINVAL;
		}
		in++;
	}
	*out = '\0';
	return 0;
}

static bool berth_fs_is_fuse(const struct super_block *sb)
{
	const char *name = sb->s_type->name;

	return !strcmp(name, "virtiofs") || !strcmp(name, "fuse");
}

/* A path split into its parent directory (looked up, referenced) and its last name. */
struct berth_target {
	struct path parent;
	struct qstr name;
};

/*
 * Splits the absolute path @s (modified: the last '/' becomes a NUL unless it is the first
 * character) and looks up the parent directory.
 */
static int berth_target_get(char *s, struct berth_target *t)
{
	char *slash;
	const char *dir = "/";
	int err;

	if (s[0] != '/')
		return -EINVAL;
	slash = strrchr(s, '/');
	t->name.name = slash + 1;
	t->name.len = strlen(slash + 1);
	if (t->name.len == 0 || t->name.len > NAME_MAX ||
	    !strcmp(slash + 1, ".") || !strcmp(slash + 1, ".."))
		return -EINVAL;
	if (slash != s) {
		*slash = '\0';
		dir = s;
	}
	err = kern_path(dir, LOOKUP_FOLLOW | LOOKUP_DIRECTORY, &t->parent);
	if (err)
		return err;
	if (!berth_fs_is_fuse(t->parent.dentry->d_sb)) {
		path_put(&t->parent);
		return -EXDEV;
	}
	return 0;
}

/* The child's dentry if the dcache holds one (positive or negative), without revalidating it. */
static struct dentry *berth_cached_child(struct berth_target *t)
{
	struct dentry *parent = t->parent.dentry;
	struct qstr q = t->name;

	q.hash_len = hashlen_string(parent, t->name.name);
	if (unlikely(parent->d_flags & DCACHE_OP_HASH)) {
		if (parent->d_op->d_hash(parent, &q) < 0)
			return NULL;
	}
	return d_lookup(parent, &q);
}

/* Drops a cached dentry so the next lookup asks the host, unless something is mounted on it. */
static void berth_forget(struct dentry *dentry)
{
	if (dentry && !d_mountpoint(dentry))
		d_invalidate(dentry);
}

/* Looks the child up afresh (the FUSE lookup finds what the host has now). */
static struct dentry *berth_fresh_child(struct berth_target *t)
{
	return lookup_one_len_unlocked(t->name.name, t->parent.dentry, t->name.len);
}

static void berth_name_event(struct berth_target *t, __u32 mask, struct inode *inode, u32 cookie)
{
	struct inode *dir = d_inode(t->parent.dentry);

	/* fsnotify() needs an object; a dirent event for an uncached child names the directory. */
	if (!inode)
		inode = dir;
	fsnotify_name(mask, inode, FSNOTIFY_EVENT_INODE, dir, &t->name, cookie);
}

/* What the kernel does when an inode's last link goes: IN_DELETE_SELF, then IN_IGNORED. */
static void berth_inode_gone(struct inode *inode)
{
	if (S_ISDIR(inode->i_mode) || inode->i_nlink <= 1)
		fsnotify_inoderemove(inode);
	else
		fsnotify_link_count(inode);
}

static int berth_change(char *s, __u32 mask)
{
	struct path path;
	struct inode *inode;
	int err;

	if (s[0] != '/')
		return -EINVAL;
	err = kern_path(s, 0, &path);
	if (err)
		return err;
	if (!berth_fs_is_fuse(path.dentry->d_sb)) {
		path_put(&path);
		return -EXDEV;
	}
	inode = d_inode(path.dentry);
	if ((mask & FS_MODIFY) && S_ISREG(inode->i_mode))
		invalidate_mapping_pages(inode->i_mapping, 0, -1);
	fsnotify_dentry(path.dentry, mask);
	path_put(&path);
	return 0;
}

static int berth_create(char *s)
{
	struct berth_target t;
	struct dentry *child;
	struct inode *inode;
	__u32 mask = FS_CREATE;
	int err;

	err = berth_target_get(s, &t);
	if (err)
		return err;
	child = berth_cached_child(&t);
	berth_forget(child);
	dput(child);
	child = berth_fresh_child(&t);
	if (IS_ERR(child)) {
		err = PTR_ERR(child);
		goto out;
	}
	if (d_really_is_negative(child)) {
		err = -ENOENT;
	} else {
		inode = d_inode(child);
		if (S_ISDIR(inode->i_mode))
			mask |= FS_ISDIR;
		berth_name_event(&t, mask, inode, 0);
	}
	dput(child);
out:
	path_put(&t.parent);
	return err;
}

static int berth_delete(char *s)
{
	struct berth_target t;
	struct dentry *child;
	struct inode *inode = NULL;
	__u32 mask = FS_DELETE;
	int err;

	err = berth_target_get(s, &t);
	if (err)
		return err;
	child = berth_cached_child(&t);
	if (child && d_really_is_positive(child)) {
		inode = d_inode(child);
		ihold(inode);
		if (S_ISDIR(inode->i_mode))
			mask |= FS_ISDIR;
	}
	berth_forget(child);
	dput(child);
	if (inode)
		berth_inode_gone(inode);
	berth_name_event(&t, mask, inode, 0);
	iput(inode);
	path_put(&t.parent);
	return 0;
}

/* The inode a cached positive dentry names, referenced, or NULL. */
static struct inode *berth_take_cached(struct berth_target *t)
{
	struct dentry *child = berth_cached_child(t);
	struct inode *inode = NULL;

	if (child && d_really_is_positive(child)) {
		inode = d_inode(child);
		ihold(inode);
	}
	berth_forget(child);
	dput(child);
	return inode;
}

static int berth_rename(char *old, char *new)
{
	struct berth_target from, to;
	struct inode *moved, *target, *now = NULL;
	struct dentry *child;
	__u32 isdir = 0;
	u32 cookie;
	int err;

	err = berth_target_get(old, &from);
	if (err)
		return err;
	err = berth_target_get(new, &to);
	if (err) {
		path_put(&from.parent);
		return err;
	}
	moved = berth_take_cached(&from);
	target = berth_take_cached(&to);
	child = berth_fresh_child(&to);
	if (!IS_ERR(child) && d_really_is_positive(child)) {
		now = d_inode(child);
		ihold(now);
	}
	if (!IS_ERR(child))
		dput(child);

	if ((moved && S_ISDIR(moved->i_mode)) || (now && S_ISDIR(now->i_mode)))
		isdir = FS_ISDIR;
	cookie = fsnotify_get_cookie();
	berth_name_event(&from, FS_MOVED_FROM | isdir, now ? now : moved, cookie);
	if (now)
		berth_name_event(&to, FS_MOVED_TO | isdir, now, cookie);
	if (target && target != now && target != moved)
		berth_inode_gone(target);
	if (moved)
		fsnotify_inode(moved, FS_MOVE_SELF);

	iput(now);
	iput(target);
	iput(moved);
	path_put(&to.parent);
	path_put(&from.parent);
	return 0;
}

static int berth_event(char *line)
{
	char *arg = strchr(line, ' ');
	char *tab;
	int err;

	if (!arg)
		return -EINVAL;
	*arg++ = '\0';
	if (!strcmp(line, "rename")) {
		tab = strchr(arg, '\t');
		if (!tab)
			return -EINVAL;
		*tab++ = '\0';
		err = berth_unescape(arg);
		if (!err)
			err = berth_unescape(tab);
		return err ? err : berth_rename(arg, tab);
	}
	if (strchr(arg, '\t'))
		return -EINVAL;
	err = berth_unescape(arg);
	if (err)
		return err;
	if (!strcmp(line, "create") || !strcmp(line, "mkdir"))
		return berth_create(arg);
	if (!strcmp(line, "delete") || !strcmp(line, "rmdir"))
		return berth_delete(arg);
	if (!strcmp(line, "modify"))
		return berth_change(arg, FS_MODIFY);
	if (!strcmp(line, "attrib"))
		return berth_change(arg, FS_ATTRIB);
	return -EINVAL;
}

static ssize_t berth_notify_write(struct file *file, const char __user *ubuf, size_t count,
				  loff_t *ppos)
{
	char *line;
	size_t len = count;
	int err;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	if (count == 0 || count > BERTH_NOTIFY_MAX_LINE)
		return -EINVAL;
	line = memdup_user_nul(ubuf, count);
	if (IS_ERR(line))
		return PTR_ERR(line);
	if (line[len - 1] == '\n')
		line[--len] = '\0';
	/* One event per write: no NUL and no raw newline inside the line. */
	if (strlen(line) != len || strchr(line, '\n'))
		err = -EINVAL;
	else
		err = berth_event(line);
	kfree(line);
	return err ? err : count;
}

static const struct proc_ops berth_notify_ops = {
	.proc_write = berth_notify_write,
	.proc_lseek = noop_llseek,
};

static int __init berth_notify_init(void)
{
	if (!proc_create("berth-notify", 0200, NULL, &berth_notify_ops))
		return -ENOMEM;
	return 0;
}
device_initcall(berth_notify_init);
