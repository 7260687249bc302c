//! The settings window's side: the VM's settings in Berth's config file (read, validated and
//! written exactly as `berth config set` does, through the host proxy's `config` module), the
//! app's own preferences (`desktop.toml` beside it), and "Start Berth when I log in".

use std::path::{Path, PathBuf};

use berth_host_proxy::config::{self, Config};
use berth_host_proxy::{chain, Layout};
use serde::{Deserialize, Serialize};

/// Where the settings live; tests point them into a temporary directory.
#[derive(Clone, Debug)]
pub struct Paths {
    /// Berth's config file (`~/.config/berth/config.toml`, or `$BERTH_CONFIG`).
    pub config: PathBuf,
    /// The app's own preferences, beside the config file.
    pub prefs: PathBuf,
    /// The XDG autostart entry (`~/.config/autostart/berth.desktop`).
    pub autostart: PathBuf,
    pub layout: Layout,
}

impl Paths {
    pub fn from_env() -> Result<Paths, String> {
        let config = config::path().map_err(|e| chain(&e))?;
        let prefs = config
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("desktop.toml");
        let autostart = dirs::config_dir()
            .ok_or("cannot find the config directory (no home directory?)")?
            .join("autostart")
            .join("berth.desktop");
        let layout = Layout::from_env().map_err(|e| chain(&e))?;
        Ok(Paths {
            config,
            prefs,
            autostart,
            layout,
        })
    }
}

/// The app's own preferences.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prefs {
    /// Quitting the app also stops the VM (as `berth stop` does); by default the VM runs on.
    #[serde(default)]
    pub quit_stops_vm: bool,
}

impl Prefs {
    pub fn load(path: &Path) -> Result<Prefs, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| {
                format!(
                    "{}: {}",
                    path.display(),
                    e.message().trim_end().replace('\n', " ")
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Prefs::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), String> {
        let text = toml::to_string(self).map_err(|e| e.to_string())?;
        write(path, text.as_bytes())
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    berth_host_proxy::layout::write_atomic(path, bytes)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShareView {
    pub path: PathBuf,
    pub read_only: bool,
}

/// What the settings form shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct View {
    pub cpus: u64,
    pub memory_mib: u64,
    pub disk_size_gib: u64,
    pub shares: Vec<ShareView>,
    /// No `shares` in the file: the defaults (home and temporary directory) are in effect.
    pub shares_default: bool,
    pub bind_address: Option<String>,
    pub config_path: PathBuf,
    pub autostart: bool,
    pub quit_stops_vm: bool,
}

pub fn view(paths: &Paths) -> Result<View, String> {
    let config = Config::load(&paths.config).map_err(|e| chain(&e))?;
    let shares = match &config.shares {
        Some(configured) => configured
            .iter()
            .map(|s| ShareView {
                path: s.path.clone(),
                read_only: s.read_only,
            })
            .collect(),
        None => config
            .shares()
            .map_err(|e| chain(&e))?
            .into_iter()
            .map(|s| ShareView {
                path: s.path,
                read_only: s.read_only,
            })
            .collect(),
    };
    Ok(View {
        cpus: config.cpus,
        memory_mib: config.memory_mib,
        disk_size_gib: config.disk_size_gib,
        shares,
        shares_default: config.shares.is_none(),
        bind_address: config.ports.bind_address.map(|a| a.to_string()),
        config_path: paths.config.clone(),
        autostart: paths.autostart.is_file(),
        quit_stops_vm: Prefs::load(&paths.prefs)?.quit_stops_vm,
    })
}

/// The fields the form changed, as typed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Changes {
    pub cpus: Option<String>,
    pub memory_mib: Option<String>,
    pub disk_size_gib: Option<String>,
    /// `PATH[:ro|:rw],...`; empty shares nothing.
    pub shares: Option<String>,
    /// `true`: no `shares` in the file any more, the defaults apply again (with no `shares`).
    pub shares_default: Option<bool>,
    /// Empty: back to the default.
    pub bind_address: Option<String>,
}

/// Applies `changes` to the config file as `berth config set` would, all or nothing: the first
/// bad value is named and the file stays as it was. Returns whether anything changed.
pub fn save(paths: &Paths, changes: &Changes) -> Result<bool, String> {
    let before = Config::load(&paths.config).map_err(|e| chain(&e))?;
    let mut config = before.clone();
    if changes.shares_default == Some(true) {
        if changes.shares.is_some() {
            return Err("shares: either a list of folders or the defaults, not both".into());
        }
        config.unset("shares").map_err(|e| chain(&e))?;
    }
    let fields = [
        ("cpus", &changes.cpus),
        ("memory_mib", &changes.memory_mib),
        ("disk_size_gib", &changes.disk_size_gib),
        ("shares", &changes.shares),
        ("ports.bind_address", &changes.bind_address),
    ];
    for (key, value) in fields {
        let Some(value) = value else { continue };
        let outcome = if key == "ports.bind_address" && value.trim().is_empty() {
            config.unset(key)
        } else {
            config.set(key, value)
        };
        outcome.map_err(|e| chain(&e))?;
    }
    if config == before {
        return Ok(false);
    }
    if config.disk_size_gib != before.disk_size_gib {
        config::check_disk_not_shrunk(&paths.layout, config.disk_size_gib)
            .map_err(|e| chain(&e))?;
    }
    config.save(&paths.config).map_err(|e| chain(&e))?;
    Ok(true)
}

/// The XDG autostart entry that starts the app, and with it Berth, at login.
pub fn autostart_entry(exe: &Path) -> String {
    format!(
        "[Desktop Entry]\nType=Application\nName=Berth\nComment=Start Berth and its tray icon \
         when you log in\nExec={} --start --hidden\nTerminal=false\nX-GNOME-Autostart-enabled=true\n",
        desktop_exec_arg(&exe.to_string_lossy())
    )
}

/// A program path as the Desktop Entry spec quotes an `Exec` argument: plain when it has no
/// reserved character, else in double quotes with `"`, `` ` ``, `$` and `\` escaped (and `%`
/// doubled, the field codes' escape).
fn desktop_exec_arg(arg: &str) -> String {
    let arg = arg.replace('%', "%%");
    let reserved = |c: char| " \t\n\"'\\><~|&;$*?#()`".contains(c);
    if !arg.chars().any(reserved) {
        return arg;
    }
    let mut quoted = String::from("\"");
    for c in arg.chars() {
        if matches!(c, '"' | '`' | '$' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// Turns "Start Berth when I log in" on or off.
pub fn set_autostart(paths: &Paths, on: bool, exe: &Path) -> Result<(), String> {
    if !cfg!(target_os = "linux") {
        // macOS: a LaunchAgent plist in ~/Library/LaunchAgents (or SMAppService); Windows: a
        // value under HKCU\Software\Microsoft\Windows\CurrentVersion\Run.
        return Err("starting at login is only done on Linux so far".into());
    }
    if on {
        write(&paths.autostart, autostart_entry(exe).as_bytes())
    } else {
        match std::fs::remove_file(&paths.autostart) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot remove {}: {e}", paths.autostart.display())),
        }
    }
}

pub fn set_quit_stops_vm(paths: &Paths, on: bool) -> Result<(), String> {
    let mut prefs = Prefs::load(&paths.prefs)?;
    prefs.quit_stops_vm = on;
    prefs.save(&paths.prefs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> Paths {
        Paths {
            config: dir.join("config/berth/config.toml"),
            prefs: dir.join("config/berth/desktop.toml"),
            autostart: dir.join("config/autostart/berth.desktop"),
            layout: Layout::new(dir.join("home")),
        }
    }

    #[test]
    fn a_save_validates_as_berth_config_does_and_a_bad_value_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        let shared = dir.path().join("src");
        std::fs::create_dir(&shared).unwrap();
        let changes = Changes {
            cpus: Some("3".into()),
            memory_mib: Some(" 2048".into()),
            shares: Some(format!("{}:ro", shared.display())),
            bind_address: Some("127.0.0.1".into()),
            ..Default::default()
        };
        assert_eq!(save(&p, &changes), Ok(true));
        let written = std::fs::read_to_string(&p.config).unwrap();
        let config = Config::load(&p.config).unwrap();
        assert_eq!((config.cpus, config.memory_mib), (3, 2048), "{written}");
        assert_eq!(config.ports.bind_address, Some([127, 0, 0, 1].into()));
        let v = view(&p).unwrap();
        assert!(!v.shares_default);
        assert_eq!(
            v.shares,
            [ShareView {
                path: shared.clone(),
                read_only: true
            }]
        );
        assert_eq!(
            save(&p, &changes),
            Ok(false),
            "the same values again change nothing"
        );

        for (bad, said) in [
            (
                Changes {
                    cpus: Some("8".into()),
                    memory_mib: Some("lots".into()),
                    ..Default::default()
                },
                "memory_mib must be a whole number, not \"lots\"",
            ),
            (
                Changes {
                    memory_mib: Some("100".into()),
                    ..Default::default()
                },
                "memory_mib must be at least 256",
            ),
            (
                Changes {
                    shares: Some("relative/dir".into()),
                    ..Default::default()
                },
                "is not an absolute path",
            ),
            (
                Changes {
                    bind_address: Some("localhost:80".into()),
                    ..Default::default()
                },
                "ports.bind_address: \"localhost:80\" is not an IP address",
            ),
        ] {
            let err = save(&p, &bad).unwrap_err();
            assert!(err.contains(said), "{err}");
            assert_eq!(std::fs::read_to_string(&p.config).unwrap(), written);
        }

        // Empty: the bind address goes back to its default.
        let reset = Changes {
            bind_address: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(save(&p, &reset), Ok(true));
        assert_eq!(view(&p).unwrap().bind_address, None);
    }

    #[test]
    fn shares_go_from_the_defaults_to_nothing_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        assert!(view(&p).unwrap().shares_default);
        let nothing = Changes {
            shares: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(save(&p, &nothing), Ok(true));
        let v = view(&p).unwrap();
        assert!(!v.shares_default && v.shares.is_empty(), "{:?}", v.shares);
        assert!(Config::load(&p.config)
            .unwrap()
            .shares()
            .unwrap()
            .is_empty());

        let both = Changes {
            shares: Some("/srv".into()),
            shares_default: Some(true),
            ..Default::default()
        };
        let written = std::fs::read_to_string(&p.config).unwrap();
        assert!(save(&p, &both).unwrap_err().contains("not both"));
        assert_eq!(std::fs::read_to_string(&p.config).unwrap(), written);

        let defaults = Changes {
            shares_default: Some(true),
            ..Default::default()
        };
        assert_eq!(save(&p, &defaults), Ok(true));
        let v = view(&p).unwrap();
        assert!(v.shares_default && !v.shares.is_empty(), "{:?}", v.shares);
        assert_eq!(save(&p, &defaults), Ok(false), "already the defaults");
    }

    #[test]
    fn the_data_disk_is_not_shrunk_from_the_settings() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        std::fs::create_dir_all(p.layout.home()).unwrap();
        let disk = std::fs::File::create(p.layout.data_disk()).unwrap();
        disk.set_len(5 << 30).unwrap();
        let smaller = Changes {
            disk_size_gib: Some("4".into()),
            ..Default::default()
        };
        let err = save(&p, &smaller).unwrap_err();
        assert!(
            err.contains("is 5 GiB: shrinking it to 4 GiB is refused"),
            "{err}"
        );
        assert!(!p.config.exists());
        let larger = Changes {
            disk_size_gib: Some("100".into()),
            ..Default::default()
        };
        assert_eq!(save(&p, &larger), Ok(true));
    }

    #[test]
    fn the_autostart_entry_and_the_quit_preference_are_files_that_come_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        assert!(!view(&p).unwrap().autostart);
        set_autostart(&p, true, Path::new("/opt/My Apps/berth-desktop")).unwrap();
        let entry = std::fs::read_to_string(&p.autostart).unwrap();
        assert!(
            entry.contains("\nExec=\"/opt/My Apps/berth-desktop\" --start --hidden\n"),
            "{entry}"
        );
        assert!(view(&p).unwrap().autostart);
        set_autostart(&p, false, Path::new("/usr/bin/berth-desktop")).unwrap();
        set_autostart(&p, false, Path::new("/usr/bin/berth-desktop")).unwrap();
        assert!(!view(&p).unwrap().autostart);

        assert!(!view(&p).unwrap().quit_stops_vm);
        set_quit_stops_vm(&p, true).unwrap();
        assert!(view(&p).unwrap().quit_stops_vm);
        std::fs::write(&p.prefs, "quit_stops_vm = \"yes\"\n").unwrap();
        let err = view(&p).unwrap_err();
        assert!(err.contains("desktop.toml"), "{err}");
    }

    #[test]
    fn exec_arguments_are_quoted_as_the_desktop_entry_spec_says() {
        assert_eq!(
            desktop_exec_arg("/usr/bin/berth-desktop"),
            "/usr/bin/berth-desktop"
        );
        assert_eq!(desktop_exec_arg("/a b/$x\\y"), "\"/a b/\\$x\\\\y\"");
        assert_eq!(desktop_exec_arg("/100%/app"), "/100%%/app");
    }
}
