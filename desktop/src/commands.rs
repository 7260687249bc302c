//! The commands the dashboard calls (`window.__TAURI__.core.invoke`). Each answers JSON or a
//! sentence saying what went wrong; none holds lifecycle logic: they ask the control API, the
//! Docker socket or the config file.

use futures_util::StreamExt;
use serde::Serialize;
use tauri::{AppHandle, Emitter, State};

use crate::app::{self, App};
use crate::docker::{self, Action};
use crate::settings::{self, Changes};
use crate::vm::Overview;

pub fn handler() -> impl Fn(tauri::ipc::Invoke) -> bool + Send + Sync + 'static {
    tauri::generate_handler![
        overview,
        start,
        stop,
        restart,
        containers,
        container_action,
        images,
        remove_image,
        volumes,
        remove_volume,
        follow_logs,
        stop_logs,
        settings,
        save_settings,
        set_autostart,
        set_quit_stops_vm,
        diagnose,
        open_url,
        open_logs,
    ]
}

#[tauri::command]
async fn overview(app: State<'_, App>) -> Result<Overview, String> {
    let socket = app.docker_socket();
    let docker_answers = async {
        let docker = app.docker()?;
        docker::ping(&docker, &socket).await
    };
    Ok(app.berth.overview(docker_answers).await)
}

#[tauri::command]
async fn start(app: State<'_, App>) -> Result<(), String> {
    app.berth.start().await
}

#[tauri::command]
async fn stop(app: State<'_, App>) -> Result<(), String> {
    app.berth.stop().await
}

#[tauri::command]
async fn restart(app: State<'_, App>) -> Result<(), String> {
    app.berth.restart().await
}

#[tauri::command]
async fn containers(app: State<'_, App>) -> Result<Vec<docker::Container>, String> {
    docker::containers(&app.docker()?, &app.docker_socket()).await
}

#[tauri::command]
async fn container_action(app: State<'_, App>, id: String, action: String) -> Result<(), String> {
    let action = Action::parse(&action)?;
    docker::act(&app.docker()?, &app.docker_socket(), &id, action).await
}

#[tauri::command]
async fn images(app: State<'_, App>) -> Result<Vec<docker::Image>, String> {
    docker::images(&app.docker()?, &app.docker_socket()).await
}

#[tauri::command]
async fn remove_image(app: State<'_, App>, id: String) -> Result<(), String> {
    docker::remove_image(&app.docker()?, &app.docker_socket(), &id).await
}

#[tauri::command]
async fn volumes(app: State<'_, App>) -> Result<Vec<docker::Volume>, String> {
    docker::volumes(&app.docker()?, &app.docker_socket()).await
}

#[tauri::command]
async fn remove_volume(app: State<'_, App>, name: String) -> Result<(), String> {
    docker::remove_volume(&app.docker()?, &app.docker_socket(), &name).await
}

#[derive(Clone, Serialize)]
struct LogEvent<'a> {
    id: &'a str,
    stream: &'a str,
    line: &'a str,
}

/// Streams the container's log to the window as `container-log` events, then one
/// `container-log-end`.
#[tauri::command]
async fn follow_logs(handle: AppHandle, app: State<'_, App>, id: String) -> Result<(), String> {
    let docker = app.docker()?;
    let mut stream = Box::pin(docker::follow_logs(&docker, &app.docker_socket(), &id));
    let task_id = id.clone();
    let task_handle = handle.clone();
    let task = tauri::async_runtime::spawn(async move {
        let mut message = "the container's log ended (the container stopped)".to_string();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(lines) => {
                    for l in &lines {
                        let event = LogEvent {
                            id: &task_id,
                            stream: l.stream,
                            line: &l.line,
                        };
                        let _ = task_handle.emit("container-log", event);
                    }
                }
                Err(e) => {
                    message = e;
                    break;
                }
            }
        }
        let _ = task_handle.emit(
            "container-log-end",
            serde_json::json!({"id": task_id, "message": message}),
        );
    });
    let mut logs = app.logs.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(previous) = logs.insert(id, task) {
        previous.abort();
    }
    Ok(())
}

#[tauri::command]
fn stop_logs(app: State<'_, App>, id: String) {
    if let Some(task) = app
        .logs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id)
    {
        task.abort();
    }
}

#[tauri::command]
fn settings(app: State<'_, App>) -> Result<settings::View, String> {
    settings::view(&app.paths)
}

#[derive(Serialize)]
struct Saved {
    restart_needed: bool,
    message: String,
}

#[tauri::command]
async fn save_settings(app: State<'_, App>, changes: Changes) -> Result<Saved, String> {
    let changed = settings::save(&app.paths, &changes)?;
    let path = app.paths.config.display().to_string();
    if !changed {
        return Ok(Saved {
            restart_needed: false,
            message: format!("Nothing changed in {path}"),
        });
    }
    let runs = app.berth.status().await.ok().flatten().is_some_and(|s| {
        use berth_host_proxy::control_api::model::VmState;
        matches!(s.state.state, VmState::Starting | VmState::Running)
    });
    Ok(Saved {
        restart_needed: runs,
        message: if runs {
            format!("Saved to {path}. The VM runs with its old settings until Berth restarts")
        } else {
            format!("Saved to {path}. The next start uses them")
        },
    })
}

#[tauri::command]
fn set_autostart(app: State<'_, App>, on: bool) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    settings::set_autostart(&app.paths, on, &exe)
}

#[tauri::command]
fn set_quit_stops_vm(app: State<'_, App>, on: bool) -> Result<(), String> {
    settings::set_quit_stops_vm(&app.paths, on)
}

#[derive(Serialize)]
struct Diagnosed {
    path: String,
}

/// `berth diagnose`: the path of the archive it wrote.
#[tauri::command]
async fn diagnose(app: State<'_, App>) -> Result<Diagnosed, String> {
    let (_, output) = crate::vm::run_berth(
        &app.berth.layout,
        &["diagnose"],
        "the `berth` command was not found beside this app or on PATH",
    )
    .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("`berth diagnose` failed: {}", stderr.trim()));
    }
    diagnosis_path(&stdout)
        .map(|path| Diagnosed { path })
        .ok_or_else(|| {
            format!(
                "`berth diagnose` did not say where it wrote: {}",
                stdout.trim()
            )
        })
}

/// The archive `berth diagnose` wrote: the one line it prints on stdout (what it collected
/// goes to stderr).
fn diagnosis_path(stdout: &str) -> Option<String> {
    stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(str::to_string)
}

/// Opens a published port's page in the browser: only `http://localhost:PORT` URLs.
#[tauri::command]
fn open_url(url: String) -> Result<(), String> {
    let port = url
        .strip_prefix("http://localhost:")
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| format!("{url:?} is not a published port's address"))?;
    app::open(format!("http://localhost:{port}"))
}

#[tauri::command]
fn open_logs(app: State<'_, App>) -> Result<(), String> {
    app::open(app.berth.layout.logs_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diagnosis_archive_is_found_in_what_the_cli_says() {
        assert_eq!(
            diagnosis_path("/home/u/.berth/diagnostics/berth-diagnose-20261203.tar.gz\n\n"),
            Some("/home/u/.berth/diagnostics/berth-diagnose-20261203.tar.gz".into())
        );
        assert_eq!(diagnosis_path(" \n"), None);
    }
}
