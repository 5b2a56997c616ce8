//! Events: one enum that merges terminal input with updates from the background job worker,
//! so [`crate::app::App::update`] is the only place state changes and can be tested without
//! a terminal.

use moelab::run::RunOutcome;
use ratatui::crossterm::event::{self as ct, KeyCode, KeyEventKind, KeyModifiers};
use std::path::PathBuf;
use std::sync::mpsc::Sender;

/// A key press, reduced to what the workbench binds (terminal-library independent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// A printable character.
    Char(char),
    /// Enter / Return.
    Enter,
    /// Escape.
    Esc,
    /// Tab.
    Tab,
    /// Shift-Tab.
    BackTab,
    /// Arrow up.
    Up,
    /// Arrow down.
    Down,
    /// Arrow left.
    Left,
    /// Arrow right.
    Right,
    /// Page up.
    PageUp,
    /// Page down.
    PageDown,
    /// Home.
    Home,
    /// End.
    End,
    /// Backspace.
    Backspace,
    /// Ctrl-C: quits like `q`, even while typing.
    CtrlC,
    /// Ctrl-U: clears the text being typed (readline's kill-line).
    CtrlU,
}

/// Why a job did not produce a run outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct JobFailure {
    /// The user cancelled it (as opposed to an error).
    pub cancelled: bool,
    /// The error, as the library reports it.
    pub message: String,
    /// The run directory kept for inspection, when one was created.
    pub dir: Option<PathBuf>,
}

/// What the background worker reports about a job.
#[derive(Debug)]
pub enum JobEvent {
    /// The job left the queue and is executing.
    Started {
        /// Job id.
        id: usize,
    },
    /// One step finished.
    Progress {
        /// Job id.
        id: usize,
        /// Steps done (warmup included).
        done: usize,
        /// Steps in all (warmup included).
        total: usize,
        /// Loss of the finished step.
        loss: f64,
    },
    /// The job ended.
    Finished {
        /// Job id.
        id: usize,
        /// The outcome, or why there is none.
        result: Result<Box<RunOutcome>, JobFailure>,
    },
}

/// Everything that can change the workbench's state.
#[derive(Debug)]
pub enum Event {
    /// A key press.
    Key(Key),
    /// The terminal was resized to (columns, rows).
    Resize(u16, u16),
    /// Time passed (refreshes elapsed times).
    Tick,
    /// News from the job worker.
    Job(JobEvent),
    /// The process was told to stop (SIGTERM, SIGHUP, SIGINT from outside the terminal):
    /// quit at once, cancelling jobs so they write what they measured.
    Terminate,
}

/// Translate a crossterm key event; releases and unbound keys give `None`.
pub fn key_from_crossterm(ev: &ct::KeyEvent) -> Option<Key> {
    if ev.kind == KeyEventKind::Release {
        return None;
    }
    if ev.modifiers.contains(KeyModifiers::CONTROL) {
        return match ev.code {
            KeyCode::Char('c') => Some(Key::CtrlC),
            KeyCode::Char('u') => Some(Key::CtrlU),
            _ => None,
        };
    }
    Some(match ev.code {
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Tab => Key::Tab,
        KeyCode::BackTab => Key::BackTab,
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::Left => Key::Left,
        KeyCode::Right => Key::Right,
        KeyCode::PageUp => Key::PageUp,
        KeyCode::PageDown => Key::PageDown,
        KeyCode::Home => Key::Home,
        KeyCode::End => Key::End,
        KeyCode::Backspace => Key::Backspace,
        _ => return None,
    })
}

/// Read terminal input on its own thread and forward it as [`Event`]s, so the UI loop only
/// ever waits on one channel. The thread ends when the receiver is gone or input fails.
pub fn spawn_input_thread(tx: Sender<Event>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || loop {
        let ev = match ct::read() {
            Ok(ct::Event::Key(k)) => key_from_crossterm(&k).map(Event::Key),
            Ok(ct::Event::Resize(w, h)) => Some(Event::Resize(w, h)),
            Ok(_) => None,
            Err(_) => break,
        };
        if let Some(ev) = ev {
            if tx.send(ev).is_err() {
                break;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_c_is_its_own_key_and_releases_are_ignored() {
        let ctrl_c = ct::KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(key_from_crossterm(&ctrl_c), Some(Key::CtrlC));
        let plain = ct::KeyEvent::new(KeyCode::Char('c'), KeyModifiers::NONE);
        assert_eq!(key_from_crossterm(&plain), Some(Key::Char('c')));
        let mut release = plain;
        release.kind = KeyEventKind::Release;
        assert_eq!(key_from_crossterm(&release), None);
        let ctrl_x = ct::KeyEvent::new(KeyCode::Char('x'), KeyModifiers::CONTROL);
        assert_eq!(key_from_crossterm(&ctrl_x), None);
        let ctrl_u = ct::KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL);
        assert_eq!(key_from_crossterm(&ctrl_u), Some(Key::CtrlU));
    }
}
