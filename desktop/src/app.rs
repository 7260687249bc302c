//! The app's wiring: what it manages, the tray, the dashboard window, and the one task that
//! follows the control API's event stream and shows each state change in the tray and the
//! window as it comes (no polling).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use berth_host_proxy::control_api::client::Error as ClientError;
use berth_host_proxy::control_api::model::ApiEvent;
use tauri::{AppHandle, Emitter, Manager, RunEvent, WebviewUrl, WebviewWindowBuilder, WindowEvent};

use crate::settings::{Paths, Prefs};
use crate::state::Shown;
use crate::tray::{self, Tray};
use crate::vm::Berth;

/// The dashboard window's label (capabilities/default.json names it).
pub const DASHBOARD: &str = "dashboard";
/// How soon a host proxy that was not running is looked for again.
const RECONNECT: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub hidden: bool,
    pub start: bool,
}

/// What every command and the event task share.
pub struct App {
    pub berth: Berth,
    pub paths: Paths,
    /// The log views open, by container id.
    pub logs: Mutex<HashMap<String, tauri::async_runtime::JoinHandle<()>>>,
    tray: Mutex<Option<Tray>>,
}

impl App {
    pub fn docker_socket(&self) -> std::path::PathBuf {
        self.berth.layout.docker_socket()
    }

    /// A Docker client for one call: bollard checks that the socket exists when it connects,
    /// and the socket comes and goes with the host proxy.
    pub fn docker(&self) -> Result<bollard::Docker, String> {
        crate::docker::connect(&self.docker_socket())
    }
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let paths = Paths::from_env().map_err(anyhow::Error::msg)?;
    let app = App {
        berth: Berth::new(paths.layout.clone()),
        paths,
        logs: Mutex::new(HashMap::new()),
        tray: Mutex::new(None),
    };
    let built = tauri::Builder::default()
        .manage(app)
        .invoke_handler(crate::commands::handler())
        .setup(move |tauri_app| {
            let handle = tauri_app.handle().clone();
            let tray = Tray::build(&handle, on_tray_item)?;
            *state(&handle)
                .tray
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(tray);
            tauri::async_runtime::spawn(follow(handle.clone()));
            if !options.hidden {
                show_dashboard(&handle, None);
            }
            if options.start {
                let handle = handle.clone();
                tauri::async_runtime::spawn(async move {
                    if let Err(e) = state(&handle).berth.start().await {
                        tracing::warn!("starting Berth at launch: {e}");
                        let _ = handle.emit("berth-error", e);
                    }
                });
            }
            Ok(())
        })
        .on_window_event(|window, event| {
            // Closing the dashboard keeps the app in the tray.
            if let WindowEvent::CloseRequested { api, .. } = event {
                api.prevent_close();
                let _ = window.hide();
            }
        })
        .build(tauri::generate_context!())?;
    built.run(|_, event| {
        // No window left is no reason to exit: the tray stays until Quit.
        if let RunEvent::ExitRequested {
            code: None, api, ..
        } = event
        {
            api.prevent_exit();
        }
    });
    Ok(())
}

pub fn state(app: &AppHandle) -> tauri::State<'_, App> {
    app.state::<App>()
}

/// Opens (or raises) the dashboard, on `view` when given.
pub fn show_dashboard(app: &AppHandle, view: Option<&str>) {
    let window = match app.get_webview_window(DASHBOARD) {
        Some(window) => window,
        None => {
            let built =
                WebviewWindowBuilder::new(app, DASHBOARD, WebviewUrl::App("index.html".into()))
                    .title("Berth")
                    .inner_size(960.0, 680.0)
                    .min_inner_size(720.0, 480.0)
                    .build();
            match built {
                Ok(window) => window,
                Err(e) => {
                    tracing::error!("cannot open the dashboard: {e}");
                    return;
                }
            }
        }
    };
    let _ = window.show();
    let _ = window.unminimize();
    let _ = window.set_focus();
    if let Some(view) = view {
        let _ = window.emit("show-view", view);
    }
}

fn on_tray_item(app: &AppHandle, id: &str) {
    let app = app.clone();
    match id {
        tray::id::START | tray::id::STOP | tray::id::RESTART => {
            let id = id.to_string();
            tauri::async_runtime::spawn(async move {
                let berth = &state(&app).berth;
                let done = match id.as_str() {
                    tray::id::START => berth.start().await,
                    tray::id::STOP => berth.stop().await,
                    _ => berth.restart().await,
                };
                if let Err(e) = done {
                    tracing::warn!("{id} from the tray: {e}");
                    let _ = app.emit("berth-error", e);
                }
            });
        }
        tray::id::DASHBOARD => show_dashboard(&app, Some("dashboard")),
        tray::id::SETTINGS => show_dashboard(&app, Some("settings")),
        tray::id::LOGS => {
            if let Err(e) = open(state(&app).berth.layout.logs_dir()) {
                tracing::warn!("{e}");
            }
        }
        tray::id::QUIT => {
            tauri::async_runtime::spawn(async move {
                let app_state = state(&app);
                let stops = Prefs::load(&app_state.paths.prefs)
                    .map(|p| p.quit_stops_vm)
                    .unwrap_or(false);
                if stops {
                    if let Err(e) = app_state.berth.quit().await {
                        tracing::warn!("stopping Berth on quit: {e}");
                    }
                }
                app.exit(0);
            });
        }
        _ => {}
    }
}

/// Follows the event stream for the app's whole life; while no host proxy runs, the state is
/// `absent` and the socket is tried again every `RECONNECT`.
async fn follow(app: AppHandle) {
    let mut last: Option<(Shown, Option<String>)> = None;
    loop {
        let absent_reason = match state(&app).berth.client().events().await {
            Ok(mut events) => {
                loop {
                    match events.next().await {
                        Ok(Some(ApiEvent::State(change))) => {
                            let shown = (Shown::Vm(change.state), change.reason.clone());
                            show(&app, &mut last, shown);
                            let _ = app.emit("berth-state", &change);
                        }
                        Ok(Some(ApiEvent::Port { event })) => {
                            let _ = app.emit("berth-port", &event);
                        }
                        Ok(Some(ApiEvent::Guest { .. })) => {}
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(
                                "the event stream broke: {}",
                                berth_host_proxy::chain(&e)
                            );
                            break;
                        }
                    }
                }
                Some("the host proxy ended".to_string())
            }
            Err(ClientError::NotRunning { .. }) => None,
            Err(e) => Some(berth_host_proxy::chain(&e)),
        };
        if last.as_ref().map(|(s, _)| *s) != Some(Shown::Absent) {
            show(&app, &mut last, (Shown::Absent, absent_reason.clone()));
            let _ = app.emit(
                "berth-state",
                serde_json::json!({"state": "absent", "reason": absent_reason, "since_ms": null}),
            );
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

fn show(app: &AppHandle, last: &mut Option<(Shown, Option<String>)>, now: (Shown, Option<String>)) {
    if last.as_ref() == Some(&now) {
        return;
    }
    tracing::info!("{}", now.0.tooltip(now.1.as_deref()));
    if let Some(tray) = &*state(app).tray.lock().unwrap_or_else(|e| e.into_inner()) {
        if let Err(e) = tray.show(now.0, now.1.as_deref()) {
            tracing::warn!("updating the tray: {e}");
        }
    }
    *last = Some(now);
}

/// Opens a folder or a URL with the desktop's default application.
pub fn open(target: impl AsRef<std::ffi::OsStr>) -> Result<(), String> {
    let target = target.as_ref();
    let program = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(windows) {
        "explorer"
    } else {
        "xdg-open"
    };
    std::process::Command::new(program)
        .arg(target)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(|mut child| {
            // Reaped when it ends: xdg-open hands over to the application and exits.
            std::thread::spawn(move || child.wait());
        })
        .map_err(|e| {
            format!(
                "cannot open {} with {program}: {e}",
                Path::new(target).display()
            )
        })
}
