/**
 * The FIRST JupyterLab extension: a left sidebar panel (models by cluster with live state, default model,
 * warm-up, batches, sign-in), a palette command that opens it, and its settings.
 */
import { ILayoutRestorer, type JupyterFrontEnd, type JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { LabIcon } from '@jupyterlab/ui-components';

import { GatewayApi } from './api';
import { FirstPanel, type PanelOptions } from './panel';

const PLUGIN_ID = 'first-jupyter:plugin';
const OPEN_COMMAND = 'first-jupyter:open-sidebar';
/** Left sidebar ranks below 500 belong to JupyterLab's own panels; 900 and up to late additions. */
const SIDEBAR_RANK = 650;
const DEFAULTS: PanelOptions = { refreshSeconds: 10, defaultCluster: '' };

const firstIcon = new LabIcon({
  name: 'first-jupyter:icon',
  svgstr: '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" width="16"><g class="jp-icon3" ' +
    'fill="#616161"><circle cx="5" cy="6" r="2.5"/><circle cx="19" cy="6" r="2.5"/><circle cx="12" cy="19" ' +
    'r="2.5"/><path d="M6.8 7.6 11 16.8l-1.4.7-4.2-9.2zM17.2 7.6 13 16.8l1.4.7 4.2-9.2zM7.5 5.2h9v1.6h-9z"/>' +
    '</g></svg>'
});

function readOptions(settings: ISettingRegistry.ISettings): PanelOptions {
  return {
    refreshSeconds: Number(settings.get('refreshInterval').composite ?? DEFAULTS.refreshSeconds),
    defaultCluster: String(settings.get('defaultCluster').composite ?? DEFAULTS.defaultCluster)
  };
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'The FIRST sidebar: federated inference models, their state, batches and sign-in.',
  autoStart: true,
  optional: [ILayoutRestorer, ICommandPalette, ISettingRegistry],
  activate: (app: JupyterFrontEnd, restorer: ILayoutRestorer | null, palette: ICommandPalette | null,
             registry: ISettingRegistry | null) => {
    const panel = new FirstPanel(new GatewayApi(), DEFAULTS);
    panel.title.icon = firstIcon;
    app.shell.add(panel, 'left', { rank: SIDEBAR_RANK });
    restorer?.add(panel, panel.id);

    app.commands.addCommand(OPEN_COMMAND, {
      label: 'Open the FIRST sidebar',
      caption: 'Models by cluster with their state, the default model, batches and sign-in',
      icon: firstIcon,
      execute: () => app.shell.activateById(panel.id)
    });
    palette?.addItem({ command: OPEN_COMMAND, category: 'FIRST' });

    if (registry) {
      void registry.load(PLUGIN_ID).then(settings => {
        panel.configure(readOptions(settings));
        settings.changed.connect(() => panel.configure(readOptions(settings)));
      }, (reason: unknown) => {
        console.warn(`FIRST: settings could not be read (${String(reason)}); using the defaults`);
      });
    }
  }
};

export default plugin;
