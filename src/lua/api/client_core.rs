//! What the Rust halves of the bundled clients (`resty.http`, `resty.redis`) share: the
//! userdata that holds an object's state, and the guard that allows one operation at a time
//! on an object (as a cosocket allows one reader and one writer).

use std::cell::Cell;
use std::rc::Rc;

use mlua::{AnyUserData, UserData};

/// An object's state, as far as the shared pieces need it.
pub trait Client: 'static {
    fn busy(&self) -> &Cell<bool>;
}

/// The userdata a bundled client's Lua half keeps in its object.
pub struct Handle<C>(pub Rc<C>);
impl<C: 'static> UserData for Handle<C> {}

/// The state behind a handle.
pub fn core_of<C: 'static>(ud: &AnyUserData) -> mlua::Result<Rc<C>> {
    Ok(ud.borrow::<Handle<C>>()?.0.clone())
}

/// Marks the object busy for the duration of an operation.
pub struct Busy<C: Client>(Rc<C>);

impl<C: Client> Busy<C> {
    /// `None` when another operation is running on the object.
    pub fn take(core: &Rc<C>) -> Option<Busy<C>> {
        if core.busy().replace(true) {
            return None;
        }
        Some(Busy(core.clone()))
    }
}

impl<C: Client> Drop for Busy<C> {
    fn drop(&mut self) {
        self.0.busy().set(false);
    }
}
