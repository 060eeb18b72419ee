# NixOS module: NixOS impermanence's `environment.persistence` option tree,
# applied before switch_root by impermanence_boot.py.
#
# The options under `environment.persistence` have the names, types and
# defaults of NixOS impermanence's, so an existing configuration keeps
# working when this module replaces that one (do not import both: they
# declare the same options).  Instead of fileSystems bind mounts, systemd
# services and activation scripts in stage 2, the whole tree is written as
# JSON (nix/config.nix) and applied in the initrd:
#   - scripted initrd: boot.initrd.postMountCommands, --root /mnt-root;
#   - systemd initrd (boot.initrd.systemd.enable): a oneshot service
#     ordered before initrd-nixos-activation.service, --root /sysroot.
# Extra options live under `boot.initrd.impermanence`.
{ config, lib, pkgs, utils, ... }:

let
  inherit (lib)
    mkOption mkIf mkMerge mkAfter mkDefault types literalExpression
    mapAttrs mapAttrsToList filterAttrs attrNames attrValues any all
    concatStringsSep concatMap filter optional optionals optionalString
    escapeShellArg escapeShellArgs hasPrefix unique;

  cfg = config.environment.persistence;
  icfg = config.boot.initrd.impermanence;
  accounts = config.users.users;

  enabledLocations = filterAttrs (_: location: location.enable) cfg;
  active = enabledLocations != { };

  # ---- option types ---------------------------------------------------------

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
        created and owned by the group specified by this option.
      '';
    };
    mode = mkOption {
      type = if nullable then types.nullOr types.str else types.str;
      default = mode;
      example = "0700";
      description = ''
        If the directory doesn't exist in persistent storage it will be
        created with the mode specified by this option: octal ("0700") or
        symbolic chmod clauses ("u=rwx,g=rx,o=").
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

  inHome = home: path: if home == null then path else "${home}/${path}";

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
          description = "Whether to hide the bind mount from showing up as a mounted drive.";
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
        # Unset fields are filled with the level's defaults
        # (${level.user}, its group, 0755) when any field is set; when
        # none is, the parent is created like any other missing parent
        # (a home directory itself: 0700).
        parentDirectory = permOptions { user = null; group = null; mode = null; nullable = true; };
        filePath = mkOption {
          type = types.str;
          default = inHome home config.file;
          readOnly = true;
          internal = true;
          description = "The absolute path of the file on the booted system.";
        };
      };
    }));

  primaryGroupOf = name:
    let group = accounts.${name}.group or ""; in
    if group == "" then null else group;

  locationType = types.submodule ({ name, config, ... }:
    let
      location = config;
      system = { level = { user = "root"; group = "root"; }; home = null; inherit location; };
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
          description = "Whether to hide bind mounts from showing up as mounted drives.";
        };

        directories = mkOption {
          type = types.listOf (directoryType system);
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
          type = types.listOf (fileType system);
          default = [ ];
          example = [
            "/etc/machine-id"
            { file = "/etc/nix/id_rsa"; parentDirectory = { mode = "u=rwx,g=,o="; }; }
          ];
          description = "Files that should be stored in persistent storage.";
        };

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
              level = {
                user = name;
                group = primaryGroupOf name;
              };
              userLevel = { inherit level location; inherit (config) home; };
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

        # Removed from NixOS impermanence; accepted so an old configuration
        # gets a warning instead of an evaluation error.
        allowOther = mkOption { type = types.nullOr types.bool; default = null; visible = false; };
        removePrefixDirectory = mkOption { type = types.nullOr types.bool; default = null; visible = false; };
        defaultDirectoryMethod = mkOption { type = types.nullOr types.str; default = null; visible = false; };
      };
    });

  fileSystemType = types.submodule ({ name, ... }: {
    options = {
      device = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/dev/disk/by-label/persist";
        description = ''
          The device: a path, or UUID=, LABEL=, PARTUUID=, PARTLABEL=.
        '';
      };
      label = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "Shorthand for device = /dev/disk/by-label/‹label›.";
      };
      fsType = mkOption {
        type = types.str;
        default = "auto";
        example = "ext4";
        description = ''
          The filesystem type; `auto` tries what the initrd kernel offers.
          Anything else is also added to boot.initrd.supportedFilesystems.
        '';
      };
      options = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "noatime" ];
        description = "Mount options, as in fstab.";
      };
    };
  });

  # ---- the JSON configuration and the script ----------------------------------

  locationKeys = [ "enable" "persistentStoragePath" "hideMounts" "directories" "files" "users" ];

  generated = import ./config.nix {
    persistence = mapAttrs (_: location: lib.getAttrs locationKeys location) cfg;
    users = accounts;
    groups = config.users.groups;
    fileSystems = mapAttrs (_: fs: { inherit (fs) device label fsType options; }) icfg.fileSystems;
    inherit (icfg) deviceTimeout;
  };

  script = "${icfg.package}/bin/impermanence_boot.py";
  python = "${icfg.python}/bin/python3";

  uncheckedConfig = pkgs.writeText "impermanence-unchecked.json" (builtins.toJSON generated);

  # A mistake fails the build, not the boot: `check` reads the file and
  # touches nothing else.  The initrd reads this very file, the one
  # /etc/impermanence.json holds.
  configFile =
    if icfg.checkConfig then
      pkgs.runCommandLocal "impermanence.json"
        { nativeBuildInputs = [ pkgs.buildPackages.python3Minimal ]; }
        ''
          python3 -I -B ${script} --config ${uncheckedConfig} check
          cp ${uncheckedConfig} $out
        ''
    else uncheckedConfig;

  verbose = icfg.verbose || any (location: location.enableDebugging) (attrValues enabledLocations);

  # Byte-compiled once, at build time, by the initrd's own interpreter:
  # run as a script, the .py would be compiled again at every boot (~18 ms,
  # more than the interpreter's own start-up).
  compiledScript = pkgs.runCommandLocal "impermanence_boot.pyc" { } ''
    ${python} -I -c 'import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)' ${script} $out
  '';

  # -S: the script needs nothing `site` sets up (site-packages, .pth
  # files); skipping it saves about 1 ms a boot, ten times that on a slow CPU.
  command = root: escapeShellArgs ([ python "-I" "-S" "-B" "${compiledScript}" "--root" root "--config" "${configFile}" ]
    ++ optional verbose "--verbose" ++ [ "apply" ]);

  defaultScriptPackage = pkgs.runCommandLocal "impermanence-boot" { } ''
    install -Dm0755 ${../impermanence_boot.py} $out/bin/impermanence_boot.py
  '';

  # The running system: `impermanence-boot status`, `plan`, `unmount`.
  tool = pkgs.writeShellScriptBin "impermanence-boot" ''
    exec ${python} -I -B ${script} "$@"
  '';

  # ---- checks ----------------------------------------------------------------

  storagePaths = unique (concatMap
    (location:
      [ (toString location.persistentStoragePath) ]
      ++ map (item: toString item.persistentStoragePath)
        (location.directories ++ location.files
          ++ concatMap (user: user.directories ++ user.files) (attrValues location.users)))
    (attrValues enabledLocations));

  declaredByNixOS = path: config.fileSystems ? ${path};
  storageNotNeededForBoot = filter
    (path: declaredByNixOS path && !(icfg.fileSystems ? ${path})
      && !(utils.fsNeededForBoot config.fileSystems.${path}))
    storagePaths;
  mountedTwice = filter declaredByNixOS (attrNames icfg.fileSystems);

  persistedPaths = concatMap
    (location:
      map (d: d.dirPath) (location.directories
        ++ concatMap (user: user.directories) (attrValues location.users)))
    (attrValues enabledLocations);
  persistedFilePaths = concatMap
    (location:
      map (f: f.filePath) (location.files
        ++ concatMap (user: user.files) (attrValues location.users)))
    (attrValues enabledLocations);
  # A kept machine-id is bind-mounted from storage, not on a temporary
  # filesystem: systemd-machine-id-commit.service would fail on every boot
  # after the first (as NixOS impermanence, it then runs on the first only).
  machineIdPersisted = elem "/etc/machine-id" persistedFilePaths;
  varLibNixosPersisted = any
    (path: elem path [ "/" "/var" "/var/lib" "/var/lib/nixos" ])
    persistedPaths;
  elem = builtins.elem;
  usersWithoutUid = attrNames (filterAttrs (_: user: user.uid == null) accounts);
  groupsWithoutGid = attrNames (filterAttrs (_: group: group.gid == null) config.users.groups);
  warningsEnabled = any (location: location.enableWarnings) (attrValues enabledLocations);
  removedOptionsUsed = concatMap
    (name:
      map (option: ''environment.persistence."${name}".${option}'')
        (filter (option: cfg.${name}.${option} != null)
          [ "allowOther" "removePrefixDirectory" "defaultDirectoryMethod" ]))
    (attrNames cfg);
in
{
  options = {
    environment.persistence = mkOption {
      type = types.attrsOf locationType;
      default = { };
      description = ''
        Persistent storage locations, each listing the files and
        directories that are bind mounted or linked from it into the
        freshly wiped root before switch_root.  Each attribute name is
        the path of a persistent storage location (see
        persistentStoragePath).
      '';
      example = literalExpression ''
        {
          "/persistent" = {
            hideMounts = true;
            directories = [
              "/var/log"
              "/var/lib/nixos"
              { directory = "/var/lib/colord"; user = "colord"; group = "colord"; mode = "u=rwx,g=rx,o="; }
            ];
            files = [
              "/etc/machine-id"
              { file = "/etc/nix/id_rsa"; parentDirectory = { mode = "u=rwx,g=,o="; }; }
            ];
            users.alice.directories = [ "Downloads" { directory = ".ssh"; mode = "0700"; } ];
          };
        }
      '';
    };

    boot.initrd.impermanence = {
      fileSystems = mkOption {
        type = types.attrsOf fileSystemType;
        default = { };
        example = literalExpression ''
          { "/persistent" = { device = "/dev/disk/by-label/persist"; fsType = "ext4"; options = [ "noatime" ]; }; }
        '';
        description = ''
          Persistent filesystems impermanence_boot.py mounts itself, under
          the new root, keyed by mount point.  It waits up to deviceTimeout
          seconds for each device; when a device never appears, nothing is
          bound from that location and the boot goes on (see
          emergencyOnError).  A storage path not listed here must be
          mounted by stage 1: declare it in `fileSystems` with
          `neededForBoot = true` (or keep it on the root filesystem).
          Do not list a mount point both here and in `fileSystems`.
        '';
      };

      deviceTimeout = mkOption {
        type = types.ints.unsigned;
        default = 30;
        description = "Seconds to wait for each device of boot.initrd.impermanence.fileSystems.";
      };

      verbose = mkOption {
        type = types.bool;
        default = false;
        description = "Log every action (to the console and the kernel log), not only errors.";
      };

      emergencyOnError = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Stop the boot (emergency shell) when the configuration cannot be
          used or a persistent storage location is unavailable (exit
          status 2 or 3).  By default the boot goes on with whatever could
          be applied; the errors are in the kernel log / journal.  Single
          entries that fail (exit status 1) never stop the boot.
        '';
      };

      checkConfig = mkOption {
        type = types.bool;
        default = true;
        description = "Validate the generated JSON with `impermanence_boot.py check` at build time.";
      };

      python = mkOption {
        type = types.package;
        default = pkgs.python3Minimal;
        defaultText = literalExpression "pkgs.python3Minimal";
        description = "The Python interpreter put into the initrd (3.9 or newer).";
      };

      package = mkOption {
        type = types.package;
        default = defaultScriptPackage;
        defaultText = "impermanence_boot.py from this repository";
        description = "A package providing bin/impermanence_boot.py.";
      };

      configFile = mkOption {
        type = types.path;
        readOnly = true;
        default = configFile;
        defaultText = "the generated JSON";
        description = ''
          The generated configuration (the JSON form of
          environment.persistence); also installed as /etc/impermanence.json
          in the initrd and on the running system.
        '';
      };
    };
  };

  config = mkIf active (mkMerge [
    {
      boot.initrd.supportedFilesystems =
        unique (filter (t: t != "auto") (map (fs: fs.fsType) (attrValues icfg.fileSystems)));

      environment.etc."impermanence.json".source = configFile;
      environment.systemPackages = [ tool ];

      assertions = [
        {
          assertion = storageNotNeededForBoot == [ ];
          message = ''
            environment.persistence: these persistent storage paths are in
            `fileSystems` but not mounted by stage 1, so they are not there
            when impermanence_boot.py runs; set neededForBoot = true (or move
            them to boot.initrd.impermanence.fileSystems):
              ${concatStringsSep "\n  " storageNotNeededForBoot}
          '';
        }
        {
          assertion = mountedTwice == [ ];
          message = ''
            boot.initrd.impermanence.fileSystems: these mount points are also
            declared in `fileSystems`; declare each in one place only:
              ${concatStringsSep "\n  " mountedTwice}
          '';
        }
        {
          assertion = all (fs: fs.device != null || fs.label != null) (attrValues icfg.fileSystems);
          message = "boot.initrd.impermanence.fileSystems: every entry needs `device' or `label'.";
        }
      ];

      warnings =
        map (option: "${option} has no effect (removed from NixOS impermanence, not used here).")
          removedOptionsUsed
        ++ optional
          (warningsEnabled && !varLibNixosPersisted && (usersWithoutUid != [ ] || groupsWithoutGid != [ ]))
          ''
            environment.persistence: /var/lib/nixos is not persisted, so users
            and groups without a fixed uid/gid get new ids on every boot, and
            their names cannot be resolved in the initrd (uid-map, gid-map).
            Users without uid: ${concatStringsSep " " usersWithoutUid}
            Groups without gid: ${concatStringsSep " " groupsWithoutGid}
          '';
    }

    (mkIf machineIdPersisted {
      systemd.services.systemd-machine-id-commit.unitConfig.ConditionFirstBoot = true;
    })

    (mkIf (machineIdPersisted && config.boot.initrd.systemd.enable) {
      boot.initrd.systemd.suppressedUnits = [ "systemd-machine-id-commit.service" ];
    })

    (mkIf (!config.boot.initrd.systemd.enable) {
      # extraFiles puts the interpreter, the script and the JSON (with
      # their closures) into the initrd; /etc/impermanence.json there is
      # the default config for a manual run from the emergency shell.
      boot.initrd.extraFiles = {
        "/etc/impermanence.json".source = configFile;
        "/etc/impermanence-boot/python".source = icfg.python;
        "/etc/impermanence-boot/script".source = icfg.package;
        "/etc/impermanence-boot/impermanence_boot.pyc".source = compiledScript;
      };
      boot.initrd.postMountCommands = mkAfter ''
        impermanence_status=0
        ${command "/mnt-root"} || impermanence_status=$?
        if [ "$impermanence_status" -ne 0 ]; then
          echo "impermanence: impermanence_boot.py exited with status $impermanence_status (see the messages above)"
          ${optionalString icfg.emergencyOnError ''
            if [ "$impermanence_status" -ge 2 ]; then fail; fi
          ''}
        fi
      '';
    })

    (mkIf config.boot.initrd.systemd.enable {
      boot.initrd.systemd.storePaths = [ icfg.python icfg.package compiledScript configFile ];
      boot.initrd.systemd.contents."/etc/impermanence.json".source = configFile;
      boot.initrd.systemd.services.impermanence-boot = {
        description = "Persistent state for the wiped root (impermanence)";
        wantedBy = [ "initrd.target" ];
        requiredBy = optional icfg.emergencyOnError "initrd.target";
        after = [ "initrd-root-fs.target" "initrd-fs.target" ];
        before = [ "initrd-nixos-activation.service" "initrd.target" "initrd-switch-root.target" ];
        conflicts = [ "initrd-switch-root.target" ];
        unitConfig.DefaultDependencies = false;
        unitConfig.RequiresMountsFor = "/sysroot";
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = command "/sysroot";
          # 1: some entries failed, the rest is applied; the boot goes on.
          SuccessExitStatus = if icfg.emergencyOnError then "1" else "1 2 3";
          # The journal keeps the messages; no second copy via /dev/kmsg.
          Environment = "IMPERMANENCE_NO_KMSG=1";
          StandardOutput = "journal+console";
          StandardError = "journal+console";
        };
      };
    })
  ]);
}
