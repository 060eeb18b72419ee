# The items NixOS impermanence's nixos.nix acts on, read from a system
# evaluated with it (for the differential tests): every enabled location's
# directories and files, its users.<name> lists', and every home-manager
# user's enabled home.persistence locations', as its module gathers them.
#   directories: target (dirPath), storage, user, group (null: the user's
#     primary group, as its create-directories call does), mode (as
#     written: it goes to `mkdir --mode`), hideMount, allowTrash, home;
#   files: target (filePath), storage, method, home, and parent: the
#     parentDirectory it creates (path, user, group, mode).
{ lib, config }:

let
  inherit (lib) filter attrValues concatMap mapAttrsToList;
  users = config.users.users;
  enabled = filter (location: location.enable);
  nixos = enabled (attrValues config.environment.persistence);
  nixosUsers = concatMap (location: attrValues location.users) nixos;
  homeManager = enabled (concatMap (hm: attrValues (hm.home.persistence or { }))
    (attrValues (config.home-manager.users or { })));
  lists = nixos ++ nixosUsers ++ homeManager;
  groupOf = user: group: if group == null then users.${user}.group else group;
in
{
  directories = map
    (d: {
      target = d.dirPath;
      storage = toString d.persistentStoragePath;
      inherit (d) user mode hideMount allowTrash home;
      group = groupOf d.user d.group;
    })
    (concatMap (l: l.directories) lists);
  files = map
    (f: {
      target = f.filePath;
      storage = toString f.persistentStoragePath;
      inherit (f) method home;
      parent = {
        path = f.parentDirectory.dirPath;
        inherit (f.parentDirectory) user mode;
        group = groupOf f.parentDirectory.user f.parentDirectory.group;
      };
    })
    (concatMap (l: l.files) lists);
}
