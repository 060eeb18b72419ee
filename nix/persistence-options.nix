# The option tree of one persistent storage location, shared by the NixOS
# module (environment.persistence.<name>, nix/module.nix) and the
# home-manager module (home.persistence.<name>, nix/home-manager.nix):
# NixOS impermanence's names, types and defaults.
#
#   import ./persistence-options.nix { inherit lib; }
#     -> { location, paths }
#
# `location { accounts, home, user }` is the submodule of a location:
#   accounts  users.users (NixOS), for users.<name>'s defaults;
#   home      null at NixOS level; the home directory for home-manager,
#             where items are relative to it and owned by `user`;
#   user      home-manager's user (home.username).
# `paths` has NixOS impermanence's path handling (its lib.nix):
# `concat [ "/home/bird" "/.ssh/" ]` is "/home/bird/.ssh", empty
# components dropped; `parents "/a/b/c"` is [ "/a" "/a/b" ].
{ lib }:

let
  inherit (lib) mkOption types literalExpression;

  paths = rec {
    components = path: builtins.filter (s: builtins.isString s && s != "") (builtins.split "/" path);
    # As NixOS impermanence's concatPaths: absolute when the first is.
    concat = list:
      (if lib.hasPrefix "/" (builtins.head list) then "/" else "")
      + lib.concatStringsSep "/" (builtins.concatMap components list);
    parents = path:
      let c = components path; in
      builtins.genList (n: "/" + lib.concatStringsSep "/" (lib.take (n + 1) c)) (builtins.length c - 1);
  };

  # Options of a directory, or of a file's parent directory, that decide how
  # it is created in persistent storage when it does not exist yet.
  permOptions = { user, group, mode, nullable ? false }: {
    user = mkOption {
      type = if nullable then types.nullOr types.str else types.str;
      default = user;
      description = ''
        If the directory doesn't exist in persistent storage it will be
        created and owned by the user specified by this option.
      '';
    };
    group = mkOption {
      type = types.nullOr types.str;
      default = group;
      description = ''
        If the directory doesn't exist in persistent storage it will be
        created and owned by the group specified by this option
        (null: the user's primary group).
      '';
    };
    mode = mkOption {
      type = if nullable then types.nullOr types.str else types.str;
      default = mode;
      example = "0700";
      description = ''
        If the directory doesn't exist in persistent storage it will be
        created with the mode specified by this option: octal ("0700") or
        symbolic, read as `mkdir --mode` reads it ("u=rwx,g=rx,o=").
      '';
    };
  };

  # Options every item has: where it is stored, which home it lives in.
  commonItemOptions = { location, home }: {
    persistentStoragePath = mkOption {
      type = types.path;
      default = location.persistentStoragePath;
      defaultText = "environment.persistence.‹name›.persistentStoragePath";
      description = ''
        The path to persistent storage where the real file or directory
        should be stored.
      '';
    };
    home = mkOption {
      type = types.nullOr types.path;
      default = home;
      internal = true;
      description = "The home directory the item is placed within (null: system level).";
    };
    enableDebugging = mkOption {
      type = types.bool;
      default = location.enableDebugging;
      defaultText = "environment.persistence.‹name›.enableDebugging";
      internal = true;
      description = "Run the script with --verbose.";
    };
  };

  inHome = home: path: paths.concat [ (if home == null then "/" else home) path ];

  # `level` = { user, group } defaults of the level (system or a user).
  directoryType = { location, home, level }:
    types.coercedTo types.str (directory: { inherit directory; }) (types.submodule ({ config, ... }: {
      options = commonItemOptions { inherit location home; }
        // permOptions { inherit (level) user group; mode = "0755"; }
        // {
        directory = mkOption {
          type = types.str;
          description = "The path to the directory.";
        };
        hideMount = mkOption {
          type = types.bool;
          default = location.hideMounts;
          defaultText = "environment.persistence.‹name›.hideMounts";
          example = true;
          description = ''
            Whether to hide the bind mount from showing up as a mounted
            drive (x-gvfs-hide).
          '';
        };
        allowTrash = mkOption {
          type = types.bool;
          default = location.allowTrash;
          defaultText = "environment.persistence.‹name›.allowTrash";
          example = true;
          description = ''
            Whether to allow newer GIO-based applications to trash files
            (x-gvfs-trash).
          '';
        };
        dirPath = mkOption {
          type = types.str;
          default = inHome home config.directory;
          readOnly = true;
          internal = true;
          description = "The absolute path of the directory on the booted system.";
        };
      };
    }));

  fileType = { location, home, level }:
    types.coercedTo types.str (file: { inherit file; }) (types.submodule ({ config, ... }: {
      options = commonItemOptions { inherit location home; } // {
        file = mkOption {
          type = types.str;
          description = "The path to the file.";
        };
        method = mkOption {
          type = types.enum [ "auto" "symlink" ];
          default = "auto";
          description = ''
            How the file is put in place. `auto` bind mounts the file when
            it exists in persistent storage and otherwise creates a
            symlink to it, so that the program creating the file creates
            it in storage; `symlink` always creates a symlink.
          '';
        };
        # As NixOS impermanence: the level's owner and 0755 (the JSON
        # carries it only where it differs, so a home directory itself
        # keeps its 0700).
        parentDirectory = permOptions { inherit (level) user group; mode = "0755"; nullable = true; };
        filePath = mkOption {
          type = types.str;
          default = inHome home config.file;
          readOnly = true;
          internal = true;
          description = "The absolute path of the file on the booted system.";
        };
      };
    }));

  primaryGroupOf = accounts: name:
    let group = accounts.${name}.group or ""; in
    if group == "" then null else group;

  location = { accounts ? { }, home ? null, user ? null }:
    types.submodule ({ name, config, ... }:
      let
        location = config;
        own = {
          inherit location home;
          level = if home == null then { user = "root"; group = "root"; } else { inherit user; group = null; };
        };
      in
      {
        options = {
          enable = mkOption {
            type = types.bool;
            default = true;
            description = "Whether to enable this persistent storage location.";
          };

          persistentStoragePath = mkOption {
            type = types.path;
            default = name;
            defaultText = "‹name›";
            description = ''
              The path to persistent storage where the real files and
              directories should be stored.
            '';
          };

          hideMounts = mkOption {
            type = types.bool;
            default = false;
            example = true;
            description = ''
              Whether to hide bind mounts from showing up as mounted drives
              (x-gvfs-hide); the default of each directory's hideMount.
            '';
          };

          allowTrash = mkOption {
            type = types.bool;
            default = false;
            example = true;
            description = ''
              Whether to allow newer GIO-based applications to trash files
              (x-gvfs-trash); the default of each directory's allowTrash.
            '';
          };

          directories = mkOption {
            type = types.listOf (directoryType own);
            default = [ ];
            example = [
              "/var/log"
              "/var/lib/bluetooth"
              "/var/lib/nixos"
              "/var/lib/systemd/coredump"
              "/etc/NetworkManager/system-connections"
              { directory = "/var/lib/colord"; user = "colord"; group = "colord"; mode = "u=rwx,g=rx,o="; }
            ];
            description = "Directories to bind mount to persistent storage.";
          };

          files = mkOption {
            type = types.listOf (fileType own);
            default = [ ];
            example = [
              "/etc/machine-id"
              { file = "/etc/nix/id_rsa"; parentDirectory = { mode = "u=rwx,g=,o="; }; }
            ];
            description = "Files that should be stored in persistent storage.";
          };

          enableDebugging = mkOption {
            type = types.bool;
            default = false;
            internal = true;
            description = "Run impermanence_boot.py with --verbose (every action is logged).";
          };

          enableWarnings = mkOption {
            type = types.bool;
            default = true;
            description = "Enable non-critical warnings.";
          };
        } // lib.optionalAttrs (home == null) {
          users = mkOption {
            default = { };
            description = ''
              Files and directories kept per user, relative to the user's home
              directory.  Each attribute name is a user name.
            '';
            example = literalExpression ''
              {
                alice = {
                  directories = [
                    "Downloads"
                    { directory = ".ssh"; mode = "0700"; }
                  ];
                  files = [ ".bash_history" ];
                };
              }
            '';
            type = types.attrsOf (types.submodule ({ name, config, ... }:
              let
                userLevel = {
                  inherit location;
                  inherit (config) home;
                  level = { user = name; group = primaryGroupOf accounts name; };
                };
              in
              {
                options = {
                  home = mkOption {
                    type = types.path;
                    default = accounts.${name}.home or "/home/${name}";
                    defaultText = literalExpression "config.users.users.‹name›.home";
                    description = ''
                      The user's home directory; must match
                      users.users.‹name›.home.
                    '';
                  };
                  directories = mkOption {
                    type = types.listOf (directoryType userLevel);
                    default = [ ];
                    example = [ "Downloads" "Music" { directory = ".gnupg"; mode = "0700"; } ];
                    description = "Directories to bind mount to persistent storage.";
                  };
                  files = mkOption {
                    type = types.listOf (fileType userLevel);
                    default = [ ];
                    example = [ ".screenrc" ];
                    description = "Files that should be stored in persistent storage.";
                  };
                };
              }));
          };
        } // lib.optionalAttrs (home != null) {
          # Options of impermanence's home-manager module v1, removed in
          # v2: accepted with a warning (home-manager.nix).
          allowOther = mkOption { type = types.nullOr types.bool; default = null; visible = false; };
          removePrefixDirectory = mkOption { type = types.nullOr types.bool; default = null; visible = false; };
          defaultDirectoryMethod = mkOption { type = types.nullOr types.str; default = null; visible = false; };
        };
      });
in
{
  inherit location paths;
}
